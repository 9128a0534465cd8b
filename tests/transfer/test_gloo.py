"""The gloo backend: exact delivery between processes, concurrency, dead peers, mismatches, cancel."""
import dataclasses
import time

import pytest

from kv_helpers import (
    NUM_LAYERS,
    blocks,
    check_a_sender_dying_between_layers_fails_the_wait_fast,
    check_two_senders_fill_their_blocks_exactly,
    make_cache,
    wait_until,
)
from pdserve.engine.transfer import (
    WIRE_VERSION,
    HandshakeError,
    TransferError,
    make_receiver,
    make_sender,
)
from pdserve.engine.transfer.rendezvous import Hello, connect


@pytest.fixture
def receiver():
    receiver = make_receiver("gloo", make_cache(num_blocks=32), timeout_s=10.0)
    yield receiver
    receiver.close()


def test_two_senders_in_other_processes_fill_their_blocks_exactly(receiver):
    check_two_senders_fill_their_blocks_exactly(receiver)


def test_a_sender_that_dies_mid_transfer_fails_the_wait_fast(receiver):
    check_a_sender_dying_between_layers_fails_the_wait_fast(receiver)


def test_cancelled_transfer_drops_late_data(receiver):
    sender = make_sender("gloo", make_cache(seed=4), timeout_s=10.0)
    receiver.expect(9, (6, 7), NUM_LAYERS)
    dest = receiver.destination(9, (6, 7))
    sender.send_layer(dest, 0, (0, 1), 0)
    wait_until(lambda: receiver.kv_cache.tensor[0][:, [6, 7]].any(), timeout_s=10.0)

    receiver.cancel(9)
    for layer in range(1, NUM_LAYERS):
        sender.send_layer(dest, layer, (0, 1), 0)
    with pytest.raises(TransferError, match="UNKNOWN_TRANSFER"):
        sender.finish(dest, 2, timeout_s=10.0)

    assert not blocks(receiver.kv_cache, (6, 7))[1:].any()
    sender.close()


def test_a_sender_with_other_kv_geometry_is_refused_clearly(receiver):
    sender = make_sender("gloo", make_cache(head_dim=16), timeout_s=10.0)
    with pytest.raises(HandshakeError, match="KV geometry"):
        sender.connect(receiver.address, timeout_s=10.0)
    sender.close()


def test_a_sender_of_another_wire_version_is_refused_clearly(receiver):
    hello = Hello(WIRE_VERSION + 1, receiver.geometry, "old-sender", "", receiver.shard)
    with pytest.raises(HandshakeError, match="wire version"):
        connect(receiver.address, hello, timeout_s=10.0)
    newer = dataclasses.replace(receiver.address, wire_version=WIRE_VERSION + 1)
    with pytest.raises(HandshakeError, match="wire"):
        make_sender("gloo", make_cache()).connect(newer, timeout_s=10.0)


def test_a_receiver_that_is_gone_fails_the_send_within_the_timeout():
    receiver = make_receiver("gloo", make_cache(), timeout_s=10.0)
    address = receiver.address
    receiver.close()
    del receiver  # stops the store
    sender = make_sender("gloo", make_cache(seed=1), timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TransferError):
        sender.connect(address, timeout_s=5.0)
    assert time.monotonic() - started < 5.0


def test_a_receiver_closing_fails_the_senders_open_transfer(receiver):
    sender = make_sender("gloo", make_cache(seed=1), timeout_s=10.0)
    receiver.expect(1, (0,), NUM_LAYERS)
    dest = receiver.destination(1, (0,))
    sender.send_layer(dest, 0, (0,), 0)
    wait_until(lambda: receiver.kv_cache.tensor[0][:, 0].any(), timeout_s=10.0)

    receiver.close()
    sender.send_layer(dest, 1, (0,), 0)
    started = time.monotonic()
    with pytest.raises(TransferError, match="closed the channel"):
        sender.finish(dest, 1, timeout_s=5.0)
    assert time.monotonic() - started < 2.0
    sender.close()

