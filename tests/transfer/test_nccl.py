"""The nccl backend between two GPUs: a sender process on GPU 1 fills a receiver's pool on GPU 0."""
import multiprocessing
import time

import pytest
import torch

from kv_helpers import NUM_LAYERS, SENDER_EXIT_OK, SendPlan, blocks, make_cache, run_sender
from pdserve.engine.transfer import FailureReason, make_receiver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def receiver():
    receiver = make_receiver("nccl", make_cache(num_blocks=32, device="cuda:0"), timeout_s=20.0)
    yield receiver
    receiver.close()


def start_sender(plan: SendPlan, may_exit=None):
    process = spawn.Process(target=run_sender, args=(plan, may_exit), daemon=True)
    process.start()
    return process


def test_two_senders_on_the_other_gpu_fill_their_blocks_exactly(receiver):
    plans = [
        SendPlan(receiver.destination(1, (20, 3, 11, 7, 30)), seed=1, src_ranges=(((0, 1, 2), 0), ((5, 6), 3)),
                 backend="nccl", device="cuda:1"),
        SendPlan(receiver.destination(2, (4, 28, 16)), seed=2, src_ranges=(((9,), 0), ((3, 8), 1)),
                 backend="nccl", device="cuda:1"),
    ]
    for plan in plans:
        receiver.expect(plan.dest.transfer_id, plan.dest.block_ids, NUM_LAYERS)
    processes = [start_sender(plan) for plan in plans]

    outcomes = [receiver.wait(plan.dest.transfer_id, timeout_s=60.0) for plan in plans]
    for process in processes:
        process.join(20.0)

    assert all(o.is_ok for o in outcomes), outcomes
    assert [p.exitcode for p in processes] == [SENDER_EXIT_OK, SENDER_EXIT_OK]
    for plan in plans:
        src_ids = [b for ids, _ in plan.src_ranges for b in ids]
        expected = blocks(make_cache(seed=plan.seed), src_ids).to("cuda:0")
        assert torch.equal(blocks(receiver.kv_cache, plan.dest.block_ids), expected)
    written = {b for plan in plans for b in plan.dest.block_ids}
    assert not blocks(receiver.kv_cache, [b for b in range(32) if b not in written]).any()


def test_a_sender_that_dies_between_layers_fails_the_wait_fast(receiver):
    plan = SendPlan(receiver.destination(5, (2, 3)), seed=3, src_ranges=(((0, 1), 0),), num_layers_before_exit=2,
                    backend="nccl", device="cuda:1")
    receiver.expect(5, plan.dest.block_ids, NUM_LAYERS)
    may_exit = spawn.Event()
    process = start_sender(plan, may_exit)
    first_layer = blocks(make_cache(seed=3), [0, 1])[0].to("cuda:0")
    deadline = time.monotonic() + 60.0
    while not torch.equal(receiver.kv_cache.tensor[0][:, [2, 3]], first_layer):
        assert time.monotonic() < deadline, "the first layer never landed"
        time.sleep(0.01)

    may_exit.set()
    started = time.monotonic()
    outcome = receiver.wait(5, timeout_s=10.0)

    assert outcome.reason is FailureReason.PEER_GONE
    assert time.monotonic() - started < 5.0
    process.join(5.0)


def test_a_sender_on_the_receivers_own_gpu_is_refused_clearly(receiver):
    from pdserve.engine.transfer import HandshakeError, make_sender

    sender = make_sender("nccl", make_cache(device="cuda:0"), timeout_s=10.0)
    with pytest.raises(HandshakeError, match="nccl needs two GPUs"):
        sender.connect(receiver.address, timeout_s=10.0)
    sender.close()
