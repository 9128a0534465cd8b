"""CUDA graphs for short prefills: a few sequences, no cached prefix, up to `max_tokens` tokens in all.

A prefill of short prompts launches the same ~400 kernels as a decode step, and on
a busy host their launches take longer than the GPU's work (Llama-3-8B, 128 tokens
on an H200: 10.7 ms launched from Python, 5.3 ms of kernels). Replayed from a graph
they cost one launch, so the time to first token is the GPU's.

Shapes are fixed per graph, so a batch of s prompts of n tokens in all runs the
graph of the smallest bucket (seqs >= s, tokens >= n): seq buckets 1, 2, 4, ... up
to `max_seqs`, token buckets 16, 32, 64, ... up to `max_tokens`. In a bucket:

- the real sequences come first, packed; seq buckets past s are empty sequences
  (zero length), and the token rows n.. form one more, padding, sequence: cu_seqlens
  [0, n_1, ..., n, n, ..., n, tokens bucket], so no real query sees a padding key;
- padding rows write their K/V to the runner's scratch slot (outside every block pool);
- only each real sequence's last row reaches the vocabulary projection.

Inputs live in static device tensors refilled from pinned host mirrors, as the
decode graphs' (engine/cuda_graphs.py): tokens, positions and slots [3, max_tokens],
and offsets [max_seqs + 2 cu_seqlens, then max_seqs logit rows], int64. The
attention kernel's grid is sized by the bucket, never by the batch. Graphs share one
memory pool and are captured the first time a bucket is needed, or all at once
(`capture_all`, as GPU replicas do at start). CUDA only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .kv_cache import KvCache
from .model import Model, PrefillPlan

SMALLEST_TOKEN_BUCKET = 16


def _doubling(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2 x smallest, ... below largest, then largest."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [largest])


def prefill_token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Powers of two from 16 up to max_tokens (included)."""
    return _doubling(SMALLEST_TOKEN_BUCKET, max_tokens)


class PrefillGraphs:
    def __init__(self, model: Model, kv_cache: KvCache, max_tokens: int, max_seqs: int, scratch_slot: int):
        self.model, self.kv_cache = model, kv_cache
        self.token_buckets = prefill_token_buckets(max_tokens)
        self.seq_buckets = _doubling(1, max_seqs)
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.block_size = kv_cache.spec.block_size
        self.scratch_slot = scratch_slot
        device = kv_cache.spec.device
        self.ids = torch.zeros(3, max_tokens, dtype=torch.long, device=device)  # tokens, positions, slots
        self.offsets = torch.zeros(2 * max_seqs + 2, dtype=torch.long, device=device)  # cu_seqlens, logit rows
        self._ids_host = torch.zeros(3, max_tokens, dtype=torch.long).pin_memory()
        self._offsets_host = torch.zeros(2 * max_seqs + 2, dtype=torch.long).pin_memory()
        self._copied = torch.cuda.Event()  # the last host → device copy is done: mirrors reusable
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self._pool = None

    def bucket_for(self, num_seqs: int, num_tokens: int) -> tuple[int, int] | None:
        """(seqs, tokens) of the smallest graph that holds the batch, or None."""
        seqs = next((b for b in self.seq_buckets if b >= num_seqs), None)
        tokens = next((b for b in self.token_buckets if b >= num_tokens), None)
        return None if seqs is None or tokens is None else (seqs, tokens)

    def capture_all(self) -> None:
        for seqs in reversed(self.seq_buckets):  # largest first: the pool is sized once
            for tokens in reversed(self.token_buckets):
                self._capture((seqs, tokens))

    def run(self, prompts: Sequence[tuple[Sequence[int], tuple[int, ...]]]) -> torch.Tensor | None:
        """Logits [len(prompts), vocab] float32 of each prompt's last token, or None when no graph holds them.

        `prompts`: (token ids, block ids) per sequence, all from position 0. The logits are a view
        of the graph's static output: read them before the next run().
        """
        bucket = self.bucket_for(len(prompts), sum(len(tokens) for tokens, _ in prompts))
        if bucket is None:
            return None
        if bucket not in self._graphs:
            self._capture(bucket)
        self._copied.synchronize()  # the previous prefill's copies have read the mirrors
        self._fill(prompts, bucket)
        self._copy_inputs()
        self._graphs[bucket].replay()
        return self._logits[bucket][:len(prompts)]

    def _fill(self, prompts: Sequence[tuple[Sequence[int], tuple[int, ...]]], bucket: tuple[int, int]) -> None:
        seqs, tokens = bucket
        host, bs = self._ids_host.numpy(), self.block_size
        ends = np.cumsum([len(t) for t, _ in prompts])
        for (token_ids, block_ids), end in zip(prompts, ends):
            n = len(token_ids)
            positions = np.arange(n)
            host[0, end - n:end] = token_ids
            host[1, end - n:end] = positions
            host[2, end - n:end] = np.asarray(block_ids, dtype=np.int64)[positions // bs] * bs + positions % bs
        self._set_padding(int(ends[-1]), tokens)
        self._set_offsets(list(ends), bucket)

    def _set_offsets(self, ends: list[int], bucket: tuple[int, int]) -> None:
        """cu_seqlens: the real sequences, empty ones up to the seq bucket, then the padding one."""
        seqs, tokens = bucket
        filled = ends + [ends[-1]] * (seqs - len(ends))
        offsets = self._offsets_host.numpy()
        offsets[:seqs + 2] = [0, *filled, tokens]
        offsets[self.max_seqs + 2:self.max_seqs + 2 + seqs] = [max(end - 1, 0) for end in filled]

    def _set_padding(self, start: int, stop: int) -> None:
        """Rows start..stop write their K/V to the scratch slot and are never read."""
        host = self._ids_host.numpy()
        host[:2, start:stop] = 0
        host[2, start:stop] = self.scratch_slot

    def _copy_inputs(self) -> None:
        self.ids.copy_(self._ids_host, non_blocking=True)
        self.offsets.copy_(self._offsets_host, non_blocking=True)
        self._copied.record()

    def _forward(self, bucket: tuple[int, int]) -> torch.Tensor:
        """The prefill over the static inputs (what the graph records)."""
        seqs, tokens = bucket
        plan = PrefillPlan(cu_q=self.offsets[:seqs + 2].to(torch.int32), max_q=tokens, cu_k=None, block_ids=(),
                           context_lens=())
        rows = self.offsets[self.max_seqs + 2:self.max_seqs + 2 + seqs]
        ids = self.ids[:, :tokens]
        return self.model.forward(ids[0], ids[1], ids[2], plan, rows, self.kv_cache)

    def _capture(self, bucket: tuple[int, int]) -> None:
        # Capture over all-padding inputs (every row writes only the scratch slot): the warm-up
        # run, which also compiles the Triton kernels, then touches no block.
        self._copied.synchronize()
        self._set_padding(0, self.max_tokens)
        self._set_offsets([bucket[1]], bucket)
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
