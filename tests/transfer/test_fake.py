"""The fake backend: exact in-process delivery, and faults injected where asked."""
import pytest
import torch

from kv_helpers import NUM_LAYERS, blocks, make_cache
from pdserve.engine.transfer import (
    FailureReason,
    FaultInjection,
    HandshakeError,
    TransferError,
    make_receiver,
    make_sender,
)


def push(sender, dest, src_block_ids):
    for layer in range(NUM_LAYERS):
        sender.send_layer(dest, layer, src_block_ids, 0)
    sender.finish(dest, len(src_block_ids), timeout_s=1.0)


@pytest.fixture
def receiver():
    receiver = make_receiver("fake", make_cache())
    yield receiver
    receiver.close()


def test_blocks_arrive_exactly_and_nothing_else_changes(receiver):
    source = make_cache(seed=1)
    sender = make_sender("fake", source)
    receiver.expect(7, [9, 3, 5])
    dest = receiver.destination(7, [9, 3, 5])
    for layer in range(NUM_LAYERS):
        sender.send_layer(dest, layer, [0, 1], 0)
        sender.send_layer(dest, layer, [2], 2)
    sender.finish(dest, 3, timeout_s=1.0)

    assert receiver.wait(7, timeout_s=1.0).is_ok
    assert torch.equal(blocks(receiver.kv_cache, [9, 3, 5]), blocks(source, [0, 1, 2]))
    others = [b for b in range(16) if b not in (9, 3, 5)]
    assert not blocks(receiver.kv_cache, others).any()


def test_the_nth_transfer_fails_on_both_ends(receiver):
    sender = make_sender("fake", make_cache(seed=1), faults=FaultInjection(fail_nth=frozenset({2})))
    for tid in (1, 2, 3):
        receiver.expect(tid, [tid])
    push(sender, receiver.destination(1, [1]), [0])
    with pytest.raises(TransferError, match="injected fault"):
        push(sender, receiver.destination(2, [2]), [0])
    push(sender, receiver.destination(3, [3]), [0])

    outcomes = [receiver.wait(tid, timeout_s=1.0) for tid in (1, 2, 3)]
    assert [o.is_ok for o in outcomes] == [True, False, True]
    assert outcomes[1].reason is FailureReason.CHANNEL_ERROR
    assert not blocks(receiver.kv_cache, [2]).any()


def test_failure_probability_one_fails_every_transfer(receiver):
    sender = make_sender("fake", make_cache(seed=1), faults=FaultInjection(failure_probability=1.0))
    receiver.expect(1, [0])
    with pytest.raises(TransferError):
        push(sender, receiver.destination(1, [0]), [0])
    assert receiver.wait(1, timeout_s=1.0).reason is FailureReason.CHANNEL_ERROR


def test_a_transfer_never_finished_times_out_within_its_deadline(receiver):
    receiver.expect(1, [0])
    outcome = receiver.wait(1, timeout_s=0.05)
    assert outcome.reason is FailureReason.TIMEOUT


def test_finish_with_a_missing_layer_fails_the_transfer(receiver):
    sender = make_sender("fake", make_cache(seed=1))
    receiver.expect(1, [4, 5])
    dest = receiver.destination(1, [4, 5])
    for layer in range(NUM_LAYERS - 1):
        sender.send_layer(dest, layer, [0, 1], 0)
    with pytest.raises(TransferError, match="INCOMPLETE"):
        sender.finish(dest, 2, timeout_s=1.0)
    outcome = receiver.wait(1, timeout_s=1.0)
    assert outcome.reason is FailureReason.CHANNEL_ERROR
    assert f"layer {NUM_LAYERS - 1}" in outcome.detail


def test_data_after_cancel_is_dropped(receiver):
    sender = make_sender("fake", make_cache(seed=1))
    receiver.expect(1, [4])
    receiver.cancel(1)
    with pytest.raises(TransferError, match="UNKNOWN_TRANSFER"):
        push(sender, receiver.destination(1, [4]), [0])
    assert not receiver.kv_cache.tensor.any()


def test_a_sender_with_other_geometry_is_refused(receiver):
    sender = make_sender("fake", make_cache(head_dim=16))
    with pytest.raises(HandshakeError, match="geometry"):
        sender.connect(receiver.address, timeout_s=1.0)


def test_sending_outside_the_destination_is_a_caller_bug(receiver):
    sender = make_sender("fake", make_cache(seed=1))
    with pytest.raises(ValueError, match="outside"):
        sender.send_layer(receiver.destination(1, [4]), 0, [0, 1], 0)
