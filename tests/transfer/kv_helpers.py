"""KV pools for transfer tests, and the sender program run in a child process."""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import torch

from pdserve.engine.kv_cache import KvCache, KvCacheSpec, raw_bytes
from pdserve.engine.transfer import FailureReason, KvDestination, TransferError, make_sender

NUM_LAYERS = 4
SENDER_EXIT_OK, SENDER_EXIT_TRANSFER_ERROR = 0, 3


def make_cache(num_blocks: int = 16, seed: int | None = None, head_dim: int = 8,
               dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               scales: tuple[tuple[float, float], ...] | None = None) -> KvCache:
    """A small pool: zeros, or random values from `seed` (the same seed gives the same pool on any device);
    `scales`: an FP8 pool's (K, V) scale per layer."""
    spec = KvCacheSpec(NUM_LAYERS, num_blocks, block_size=4, num_kv_heads=2, head_dim=head_dim,
                       dtype=dtype, device=torch.device(device))
    cache = KvCache(spec, scales=scales)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=generator))
    return cache


def blocks(cache: KvCache, block_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[layers, 2, n, ...]: the given blocks of every layer (an FP8 pool's as their bytes, uint8)."""
    return raw_bytes(cache.tensor)[:, :, list(block_ids)]


@dataclass(frozen=True)
class SendPlan:
    """What a child sender does: send `src_ranges` (src block ids, first index) for every layer."""

    dest: KvDestination
    seed: int
    src_ranges: tuple[tuple[tuple[int, ...], int], ...]
    num_layers_before_exit: int | None = None  # die (os._exit) after this many layers
    backend: str = "gloo"
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16  # the sender pool's KV dtype


def run_sender(plan: SendPlan, may_exit: Event | None = None) -> None:
    """Child process body: push the plan's blocks over its backend, exit with SENDER_EXIT_*."""
    cache = make_cache(seed=plan.seed, device=plan.device, dtype=plan.dtype)
    sender = make_sender(plan.backend, cache, timeout_s=10.0)
    for layer in range(NUM_LAYERS):
        if layer == plan.num_layers_before_exit:
            may_exit.wait(10.0)
            os._exit(1)  # a crash: no close, no goodbye
        for src_block_ids, first in plan.src_ranges:
            sender.send_layer(plan.dest, layer, src_block_ids, first)
    try:
        sender.finish(plan.dest, sum(len(ids) for ids, _ in plan.src_ranges), timeout_s=10.0)
    except TransferError:
        os._exit(SENDER_EXIT_TRANSFER_ERROR)
    sender.close()


def start_sender(plan: SendPlan, may_exit: Event | None = None) -> multiprocessing.Process:
    """`run_sender(plan)` in a spawned child process."""
    process = multiprocessing.get_context("spawn").Process(target=run_sender, args=(plan, may_exit), daemon=True)
    process.start()
    return process


def check_two_senders_fill_their_blocks_exactly(receiver, timeout_s: float = 30.0, **plan_options) -> None:
    """Two sender processes push every layer in two ranges (chunked prefill) into scattered blocks;
    each destination then holds exactly its source blocks and every other block is untouched."""
    plans = [
        SendPlan(receiver.destination(1, (20, 3, 11, 7, 30)), seed=1, src_ranges=(((0, 1, 2), 0), ((5, 6), 3)),
                 **plan_options),
        SendPlan(receiver.destination(2, (4, 28, 16)), seed=2, src_ranges=(((9,), 0), ((3, 8), 1)), **plan_options),
    ]
    for plan in plans:
        receiver.expect(plan.dest.transfer_id, plan.dest.block_ids, NUM_LAYERS)
    processes = [start_sender(plan) for plan in plans]

    outcomes = [receiver.wait(plan.dest.transfer_id, timeout_s=timeout_s) for plan in plans]
    for process in processes:
        process.join(timeout_s / 2)

    assert all(o.is_ok for o in outcomes), outcomes
    assert [p.exitcode for p in processes] == [SENDER_EXIT_OK, SENDER_EXIT_OK]
    device = receiver.kv_cache.tensor.device
    for plan in plans:
        src_ids = [b for ids, _ in plan.src_ranges for b in ids]
        expected = blocks(make_cache(seed=plan.seed, dtype=plan.dtype), src_ids).to(device)
        assert torch.equal(blocks(receiver.kv_cache, plan.dest.block_ids), expected)
    written = {b for plan in plans for b in plan.dest.block_ids}
    others = [b for b in range(receiver.kv_cache.spec.num_blocks) if b not in written]
    assert not blocks(receiver.kv_cache, others).any()


def check_a_sender_dying_between_layers_fails_the_wait_fast(receiver, **plan_options) -> None:
    """A sender that exits (no goodbye) after its first layers landed: the wait ends PEER_GONE within 5 s."""
    plan = SendPlan(receiver.destination(5, (2, 3)), seed=3, src_ranges=(((0, 1), 0),), num_layers_before_exit=2,
                    **plan_options)
    receiver.expect(5, plan.dest.block_ids, NUM_LAYERS)
    may_exit = multiprocessing.get_context("spawn").Event()
    process = start_sender(plan, may_exit)
    first_layer = blocks(make_cache(seed=3), [0, 1])[0].to(receiver.kv_cache.tensor.device)
    wait_until(lambda: torch.equal(receiver.kv_cache.tensor[0][:, [2, 3]], first_layer), timeout_s=60.0)

    may_exit.set()
    started = time.monotonic()
    outcome = receiver.wait(5, timeout_s=10.0)

    assert outcome.reason is FailureReason.PEER_GONE
    assert time.monotonic() - started < 5.0
    process.join(5.0)


def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
