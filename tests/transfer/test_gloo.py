"""The gloo backend: exact delivery between processes, concurrency, dead peers, mismatches, cancel."""
import dataclasses
import multiprocessing
import time

import pytest
import torch

from kv_helpers import (
    NUM_LAYERS,
    SENDER_EXIT_OK,
    SendPlan,
    blocks,
    make_cache,
    run_sender,
)
from pdserve.engine.transfer import (
    WIRE_VERSION,
    FailureReason,
    HandshakeError,
    TransferError,
    make_receiver,
    make_sender,
)
from pdserve.engine.transfer.rendezvous import Hello, connect
from pdserve.engine.transfer.messages import KvGeometry

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def receiver():
    receiver = make_receiver("gloo", make_cache(num_blocks=32), timeout_s=10.0)
    yield receiver
    receiver.close()


def start_sender(plan: SendPlan, may_exit=None):
    process = spawn.Process(target=run_sender, args=(plan, may_exit), daemon=True)
    process.start()
    return process


def test_two_senders_in_other_processes_fill_their_blocks_exactly(receiver):
    # Each sender pushes every layer in two ranges (chunked prefill) into scattered blocks.
    plans = [
        SendPlan(receiver.destination(1, (20, 3, 11, 7, 30)), seed=1, src_ranges=(((0, 1, 2), 0), ((5, 6), 3))),
        SendPlan(receiver.destination(2, (4, 28, 16)), seed=2, src_ranges=(((9,), 0), ((3, 8), 1))),
    ]
    for plan in plans:
        receiver.expect(plan.dest.transfer_id, plan.dest.block_ids, NUM_LAYERS)
    processes = [start_sender(plan) for plan in plans]

    outcomes = [receiver.wait(plan.dest.transfer_id, timeout_s=30.0) for plan in plans]
    for process in processes:
        process.join(10.0)

    assert all(o.is_ok for o in outcomes), outcomes
    assert [p.exitcode for p in processes] == [SENDER_EXIT_OK, SENDER_EXIT_OK]
    for plan in plans:
        src_ids = [b for ids, _ in plan.src_ranges for b in ids]
        expected = blocks(make_cache(seed=plan.seed), src_ids)
        assert torch.equal(blocks(receiver.kv_cache, plan.dest.block_ids), expected)
    written = {b for plan in plans for b in plan.dest.block_ids}
    assert not blocks(receiver.kv_cache, [b for b in range(32) if b not in written]).any()


def test_a_sender_that_dies_mid_transfer_fails_the_wait_fast(receiver):
    plan = SendPlan(receiver.destination(5, (2, 3)), seed=3, src_ranges=(((0, 1), 0),), num_layers_before_exit=2)
    receiver.expect(5, plan.dest.block_ids, NUM_LAYERS)
    may_exit = spawn.Event()
    process = start_sender(plan, may_exit)
    first_layer = blocks(make_cache(seed=3), [0, 1])[0]
    wait_until(lambda: torch.equal(receiver.kv_cache.tensor[0][:, [2, 3]], first_layer), timeout_s=30.0)

    may_exit.set()
    started = time.monotonic()
    outcome = receiver.wait(5, timeout_s=10.0)

    assert outcome.reason is FailureReason.PEER_GONE
    assert time.monotonic() - started < 5.0
    process.join(5.0)


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
    geometry = KvGeometry.of(receiver.kv_cache.spec)
    with pytest.raises(HandshakeError, match="wire version"):
        connect(receiver.address, Hello(WIRE_VERSION + 1, geometry, "old-sender", ""), timeout_s=10.0)
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


def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
