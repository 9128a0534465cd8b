"""CUDA graphs for short prefills: one sequence, no cached prefix, up to `max_tokens` tokens.

A prefill of a short prompt launches the same ~400 kernels as a decode step, and on
a busy host their launches take longer than the GPU's work (Llama-3-8B, 128 tokens
on an H200: 10.7 ms launched from Python, 5.3 ms of kernels). Replayed from a graph
they cost one launch, so the time to first token is the GPU's.

Shapes are fixed per graph, so a prompt of n tokens runs the graph of the smallest
bucket >= n (`prefill_token_buckets`: 16, 32, 64, ... up to max_tokens); the
bucket's rows n.. are padding:

- they form a second sequence of the packed batch (cu_seqlens [0, n, bucket]), so
  the real sequence's causal attention never sees them;
- they write their K/V to the runner's scratch slot (outside every block pool);
- only row n - 1 reaches the vocabulary projection.

Inputs live in static device tensors refilled from pinned host mirrors, as the
decode graphs' (engine/cuda_graphs.py): tokens, positions and slots [3, max_tokens]
int64, and [cu_seqlens (3), logit row (1)] int64. The grid of the attention kernel
is sized by the bucket, never by n. Graphs share one memory pool and are captured
lazily or all at once (`capture_all`). CUDA only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .kv_cache import KvCache
from .model import Model, PrefillPlan

SMALLEST_BUCKET = 16


def prefill_token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Powers of two from 16 up to max_tokens (included)."""
    sizes, size = [], SMALLEST_BUCKET
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [max_tokens])


class PrefillGraphs:
    def __init__(self, model: Model, kv_cache: KvCache, max_tokens: int, scratch_slot: int):
        self.model, self.kv_cache = model, kv_cache
        self.buckets = prefill_token_buckets(max_tokens)
        self.max_tokens = max_tokens
        self.block_size = kv_cache.spec.block_size
        self.scratch_slot = scratch_slot
        device = kv_cache.spec.device
        self.ids = torch.zeros(3, max_tokens, dtype=torch.long, device=device)  # tokens, positions, slots
        self.offsets = torch.zeros(4, dtype=torch.long, device=device)  # cu_seqlens (3), the logit row
        self._ids_host = torch.zeros(3, max_tokens, dtype=torch.long).pin_memory()
        self._offsets_host = torch.zeros(4, dtype=torch.long).pin_memory()
        self._copied = torch.cuda.Event()  # the last host → device copy is done: mirrors reusable
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def bucket_for(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    def capture_all(self) -> None:
        for bucket in reversed(self.buckets):  # largest first: the pool is sized once
            self._capture(bucket)

    def run(self, token_ids: Sequence[int], block_ids: tuple[int, ...]) -> torch.Tensor | None:
        """Logits [1, vocab] float32 of the prompt's last token, or None when no bucket holds it.

        The logits are a view of the graph's static output: read them before the next run().
        """
        n = len(token_ids)
        bucket = self.bucket_for(n)
        if bucket is None:
            return None
        if bucket not in self._graphs:
            self._capture(bucket)
        self._copied.synchronize()  # the previous prefill's copies have read the mirrors
        self._fill(token_ids, block_ids, bucket)
        self._copy_inputs()
        self._graphs[bucket].replay()
        return self._logits[bucket]

    def _fill(self, token_ids: Sequence[int], block_ids: tuple[int, ...], bucket: int) -> None:
        n, bs = len(token_ids), self.block_size
        host = self._ids_host.numpy()
        positions = np.arange(n)
        host[0, :n] = token_ids
        host[1, :n] = positions
        host[2, :n] = np.asarray(block_ids, dtype=np.int64)[positions // bs] * bs + positions % bs
        self._set_padding(n, bucket)
        self._offsets_host.numpy()[:] = (0, n, bucket, n - 1)

    def _set_padding(self, start: int, stop: int) -> None:
        """Rows start..stop write their K/V to the scratch slot and are never read."""
        host = self._ids_host.numpy()
        host[:2, start:stop] = 0
        host[2, start:stop] = self.scratch_slot

    def _copy_inputs(self) -> None:
        self.ids.copy_(self._ids_host, non_blocking=True)
        self.offsets.copy_(self._offsets_host, non_blocking=True)
        self._copied.record()

    def _forward(self, bucket: int) -> torch.Tensor:
        """The prefill over the static inputs' first `bucket` rows (what the graph records)."""
        plan = PrefillPlan(cu_q=self.offsets[:3].to(torch.int32), max_q=bucket, cu_k=None, block_ids=(),
                           context_lens=())
        tokens, positions, slots = self.ids[0, :bucket], self.ids[1, :bucket], self.ids[2, :bucket]
        return self.model.forward(tokens, positions, slots, plan, self.offsets[3:], self.kv_cache)

    def _capture(self, bucket: int) -> None:
        # Capture over all-padding inputs (one sequence of `bucket` rows writing only the scratch
        # slot): the warm-up run, which also compiles the Triton kernels, then touches no block.
        self._copied.synchronize()
        self._set_padding(0, self.max_tokens)
        self._offsets_host.numpy()[:] = (0, bucket, bucket, bucket - 1)
        self._copy_inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: KV transfers may launch work from other threads meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[bucket] = self._forward(bucket)
        self._pool = graph.pool()
        self._graphs[bucket] = graph
