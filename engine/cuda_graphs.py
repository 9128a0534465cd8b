"""CUDA graphs for the decode step: one graph per padded batch size, in one shared memory pool.

A decode step of a 32-layer model is ~400 kernel launches; launched one by one
from Python the step costs the CPU's time (tens of ms), not the GPU's. Replayed
from a graph, they cost one launch. Shapes are fixed per graph, so:

- a batch of n sequences runs the graph of the smallest captured size >= n
  (`decode_batch_sizes`: 1, 2, 4, 8, then every multiple of 8 up to the largest
  decode batch); rows n..size are padding;
- padding rows are no-ops: context length 0 (the paged kernel writes zeros for
  them, reading no block) and a slot in the runner's scratch block, which no
  block pool hands out, so their K/V write lands where nobody reads;
- inputs live in two static device tensors, refilled before each replay from
  pinned host mirrors with asynchronous copies:

      ids            [5, max_batch] int64: tokens, positions, slots, context lens
                     (padding rows: context 0), sources; copied whole (2.5 KiB at
                     batch 64); the graph narrows the context lens to int32 itself
      sampled        [max_batch] int64: the previous step's sampled tokens, written
                     on the device by the runner; a row whose source is >= 0 takes
                     its input token from sampled[source] inside the graph
      block_tables   [max_batch, max_blocks] int32; copied only up to the last
                     row whose block ids changed (most steps: no copy at all)
      logits (output)  [size, vocab] float32, one per graph; `run` returns a
                     view of it, valid until the next step (no copy)

  the attention kernel sizes its context slices from context_lens on the
  device, so one graph serves every context length up to max_blocks blocks.

Graphs are captured lazily, the first time a padded size is needed (about a
tenth of a second each), or all at once with `capture_all`. A batch larger than
the largest size, or a sequence with more blocks than max_blocks, returns None:
the caller runs the step eagerly. CUDA only; the CPU path never comes here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .kv_cache import KvCache
from .model import DecodeAttention, Model
from .sampler import fed_back_tokens


def decode_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(8, max_batch + 1, 8))
    return tuple(sorted(set(sizes) | {max_batch}))


class DecodeGraphs:
    def __init__(self, model: Model, kv_cache: KvCache, max_batch: int, max_blocks: int, scratch_slot: int):
        self.model, self.kv_cache = model, kv_cache
        self.sizes = decode_batch_sizes(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.block_size = kv_cache.spec.block_size
        self.scratch_slot = scratch_slot
        device = kv_cache.spec.device
        # Device-side static inputs, and their pinned host mirrors.
        self.ids = torch.zeros(5, max_batch, dtype=torch.long, device=device)
        self.sampled = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self._ids_host = torch.zeros(5, max_batch, dtype=torch.long).pin_memory()
        self._tables_host = torch.zeros(max_batch, max_blocks, dtype=torch.int32).pin_memory()
        ids = self._ids_host.numpy()
        self._np = {"tokens": ids[0], "positions": ids[1], "slots": ids[2], "context_lens": ids[3],
                    "sources": ids[4], "block_tables": self._tables_host.numpy()}
        self.logit_rows = torch.arange(max_batch, dtype=torch.long, device=device)
        self._rows: list[tuple[int, ...] | None] = [None] * max_batch  # block ids in each host row
        self._num_rows = 0  # real rows in the host mirrors; the rest are padding
        self._stale_rows = 0  # host block-table rows [0, this) may differ from the device's
        self._copied = torch.cuda.Event()  # the last host → device copy is done: mirrors reusable
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def size_for(self, num_seqs: int) -> int | None:
        return next((s for s in self.sizes if s >= num_seqs), None)

    def capture_all(self) -> None:
        for size in reversed(self.sizes):  # largest first: the pool is sized once
            self._capture(size)

    def run(self, token_ids: Sequence[int], positions: Sequence[int], block_ids: Sequence[tuple[int, ...]],
            sources: Sequence[int]) -> torch.Tensor | None:
        """Logits [n, vocab] float32 of one decode step, or None when no graph fits the batch.

        The logits are a view of the graph's static output: read them before the next run().
        """
        n = len(token_ids)
        size = self.size_for(n)
        if size is None or max(map(len, block_ids)) > self.max_blocks:
            return None
        if size not in self._graphs:
            self._capture(size)
        self._copied.synchronize()  # the previous step's copies have read the mirrors
        self._fill_tables(block_ids)
        self._fill_ids(token_ids, positions, block_ids, sources)
        self._copy_inputs()
        self._graphs[size].replay()
        return self._logits[size][:n]

    def _fill_tables(self, block_ids: Sequence[tuple[int, ...]]) -> None:
        """Writes the host rows whose block ids changed, and marks them for the next copy.

        A sequence's block ids change when it grows past its blocks or the batch
        changes; callers that pass the same tuple while they don't make this O(1) a row."""
        for row, ids in enumerate(block_ids):
            held = self._rows[row]
            if held is ids:
                continue
            if held != ids:
                self._np["block_tables"][row, :len(ids)] = ids
                self._stale_rows = max(self._stale_rows, row + 1)
            self._rows[row] = ids  # equal or not, the next step compares by identity first

    def _fill_ids(self, token_ids: Sequence[int], positions: Sequence[int], block_ids: Sequence[tuple[int, ...]],
                  sources: Sequence[int]) -> None:
        """Tokens, positions, slots, context lens and sources of the n real rows; rows past them are padding."""
        n, bs, host = len(token_ids), self.block_size, self._np
        # Plain Python: at up to 64 rows cheaper than numpy's fancy indexing (~8 us however few rows).
        # First, so that a position past a sequence's blocks (IndexError) leaves the mirrors as they were.
        slots = [ids[p // bs] * bs + p % bs for ids, p in zip(block_ids, positions)]
        host["tokens"][:n] = token_ids
        host["positions"][:n] = positions
        host["sources"][:n] = sources
        host["slots"][:n] = slots
        np.add(host["positions"][:n], 1, out=host["context_lens"][:n])
        if n != self._num_rows:  # rows n.. held another batch's sequences
            self._set_padding(n, self.max_batch)
            self._num_rows = n

    def _set_padding(self, start: int, stop: int) -> None:
        """Rows start..stop become no-ops: no block read, K/V written to the scratch slot."""
        host = self._np
        host["tokens"][start:stop] = 0
        host["positions"][start:stop] = 0
        host["slots"][start:stop] = self.scratch_slot
        host["context_lens"][start:stop] = 0  # the attention kernel reads no block of a padding row
        host["sources"][start:stop] = -1

    def _copy_inputs(self) -> None:
        """ids whole; block-table rows only up to the last one that changed (most steps: none)."""
        self.ids.copy_(self._ids_host, non_blocking=True)
        if self._stale_rows:
            rows = self._stale_rows
            self.block_tables[:rows].copy_(self._tables_host[:rows], non_blocking=True)
            self._stale_rows = 0
        self._copied.record()

    def _forward(self, size: int) -> torch.Tensor:
        """The step over the static inputs' first `size` rows (what the graph records)."""
        tokens = fed_back_tokens(self.ids[0, :size], self.ids[4, :size], self.sampled)
        positions, slots = self.ids[1, :size], self.ids[2, :size]
        attention = DecodeAttention(self.block_tables[:size], self.ids[3, :size].to(torch.int32), max_context_len=None)
        return self.model.forward(tokens, positions, slots, attention, self.logit_rows[:size], self.kv_cache)

    def _capture(self, size: int) -> None:
        # Capture over all-padding inputs: the warm-up run (which also compiles the
        # Triton kernels) then writes only the scratch slot.
        self._copied.synchronize()
        self._set_padding(0, self.max_batch)
        self._num_rows = 0
        self._copy_inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: KV transfers may launch work from other threads meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[size] = self._forward(size)
        self._pool = graph.pool()
        self._graphs[size] = graph
