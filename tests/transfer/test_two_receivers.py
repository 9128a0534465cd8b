"""Transfer ids are per receiver: one sender serving two receivers that use the same ids keeps them apart."""
import pytest
import torch

from kv_helpers import NUM_LAYERS, blocks, make_cache
from pdserve.engine.transfer import make_receiver, make_sender


@pytest.mark.parametrize("backend", ["gloo", "fake"])
def test_the_same_transfer_id_at_two_receivers_lands_at_each(backend):
    source = make_cache(seed=1)
    first, second = make_cache(), make_cache()
    receivers = [make_receiver(backend, first, peer_id="decode-a"), make_receiver(backend, second, peer_id="decode-b")]
    sender = make_sender(backend, source)
    try:
        plans = [((0, 1), (5, 6)), ((2, 3), (9, 10))]  # (source blocks, destination blocks)
        dests = []
        for receiver, (_, dst) in zip(receivers, plans):
            receiver.expect(7, dst)
            dests.append(receiver.destination(7, dst))
        for layer in range(NUM_LAYERS):
            for dest, (src, _) in zip(dests, plans):
                sender.send_layer(dest, layer, src, 0)
        for dest in dests:
            sender.finish(dest, 2, timeout_s=20)
        for receiver in receivers:
            assert receiver.wait(7, timeout_s=20).is_ok
        assert torch.equal(blocks(first, (5, 6)), blocks(source, (0, 1)))
        assert torch.equal(blocks(second, (9, 10)), blocks(source, (2, 3)))
    finally:
        sender.close()
        for receiver in receivers:
            receiver.close()
