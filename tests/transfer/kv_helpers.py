"""KV pools for transfer tests, and the sender program run in a child process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import torch

from pdserve.engine.kv_cache import KvCache, KvCacheSpec
from pdserve.engine.transfer import KvDestination, TransferError, make_sender

NUM_LAYERS = 4
SENDER_EXIT_OK, SENDER_EXIT_TRANSFER_ERROR = 0, 3


def make_cache(num_blocks: int = 16, seed: int | None = None, head_dim: int = 8,
               dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> KvCache:
    """A small pool: zeros, or random values from `seed` (the same seed gives the same pool on any device)."""
    spec = KvCacheSpec(NUM_LAYERS, num_blocks, block_size=4, num_kv_heads=2, head_dim=head_dim,
                       dtype=dtype, device=torch.device(device))
    cache = KvCache(spec)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=generator))
    return cache


def blocks(cache: KvCache, block_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[layers, 2, n, ...]: the given blocks of every layer."""
    return cache.tensor[:, :, list(block_ids)]


@dataclass(frozen=True)
class SendPlan:
    """What a child sender does: send `src_ranges` (src block ids, first index) for every layer."""

    dest: KvDestination
    seed: int
    src_ranges: tuple[tuple[tuple[int, ...], int], ...]
    num_layers_before_exit: int | None = None  # die (os._exit) after this many layers
    backend: str = "gloo"
    device: str = "cpu"


def run_sender(plan: SendPlan, may_exit: Event | None = None) -> None:
    """Child process body: push the plan's blocks over its backend, exit with SENDER_EXIT_*."""
    cache = make_cache(seed=plan.seed, device=plan.device)
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
