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
- inputs live in static device tensors, refilled before each replay from
  pinned host mirrors with one asynchronous copy each (of the first `size` rows):

      tokens, positions, slots   [max_batch] int64 each
      context_lens               [max_batch] int32 (padding rows 0)
      block_tables               [max_batch, max_blocks] int32
      logits (output)            [size, vocab] float32, one per graph

  the attention kernel sizes its context slices from context_lens on the
  device, so one graph serves every context length up to max_blocks blocks.

Graphs are captured lazily, the first time a padded size is needed (about a
tenth of a second each), or all at once with `capture_all`. A batch larger than
the largest size, or a sequence with more blocks than max_blocks, returns None:
the caller runs the step eagerly. CUDA only; the CPU path never comes here.
"""
from __future__ import annotations

import torch

from .kv_cache import KvCache
from .model import DecodeAttention, LlamaModel


def decode_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(8, max_batch + 1, 8))
    return tuple(sorted(set(sizes) | {max_batch}))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KvCache, max_batch: int, max_blocks: int, scratch_slot: int):
        self.model, self.kv_cache = model, kv_cache
        self.sizes = decode_batch_sizes(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.block_size = kv_cache.spec.block_size
        self.scratch_slot = scratch_slot
        device = kv_cache.spec.device
        # Device-side static inputs (each [:size] contiguous), and their pinned host mirrors.
        shapes = {"tokens": (torch.long, (max_batch,)), "positions": (torch.long, (max_batch,)),
                  "slots": (torch.long, (max_batch,)), "context_lens": (torch.int32, (max_batch,)),
                  "block_tables": (torch.int32, (max_batch, max_blocks))}
        self.inputs = {k: torch.zeros(shape, dtype=dt, device=device) for k, (dt, shape) in shapes.items()}
        self._host = {k: torch.zeros(shape, dtype=dt).pin_memory() for k, (dt, shape) in shapes.items()}
        self._np = {k: t.numpy() for k, t in self._host.items()}
        self.logit_rows = torch.arange(max_batch, dtype=torch.long, device=device)
        self._rows: list[tuple[int, ...] | None] = [None] * max_batch  # block ids in each host row
        self._copied = torch.cuda.Event()  # the last host → device copy is done: mirrors reusable
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def size_for(self, num_seqs: int) -> int | None:
        return next((s for s in self.sizes if s >= num_seqs), None)

    def capture_all(self) -> None:
        for size in reversed(self.sizes):  # largest first: the pool is sized once
            self._capture(size)

    def run(self, token_ids: list[int], positions: list[int], block_ids: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Logits [n, vocab] float32 of one decode step, or None when no graph fits the batch."""
        n = len(token_ids)
        size = self.size_for(n)
        if size is None or any(len(b) > self.max_blocks for b in block_ids):
            return None
        if size not in self._graphs:
            self._capture(size)
        self._copied.synchronize()  # the previous step's copies have read the mirrors
        bs, host = self.block_size, self._np
        host["tokens"][:n] = token_ids
        host["positions"][:n] = positions
        host["slots"][:n] = [b[p // bs] * bs + p % bs for b, p in zip(block_ids, positions)]
        host["context_lens"][:n] = [p + 1 for p in positions]
        self._set_padding(n, size)
        tables = host["block_tables"]
        for row, ids in enumerate(block_ids):
            if self._rows[row] != ids:  # a block table changes every block_size steps, or on a batch change
                tables[row, :len(ids)] = ids
                self._rows[row] = ids
        self._copy_inputs(size)
        self._graphs[size].replay()
        return self._logits[size][:n].clone()  # the static output is overwritten by the next replay

    def _set_padding(self, start: int, stop: int) -> None:
        host = self._np
        host["tokens"][start:stop] = 0
        host["positions"][start:stop] = 0
        host["slots"][start:stop] = self.scratch_slot
        host["context_lens"][start:stop] = 0  # the attention kernel reads no block of a padding row

    def _copy_inputs(self, size: int) -> None:
        for name, device_tensor in self.inputs.items():
            device_tensor[:size].copy_(self._host[name][:size], non_blocking=True)
        self._copied.record()

    def _capture(self, size: int) -> None:
        # Capture over all-padding inputs: the warm-up run (which also compiles the
        # Triton kernels) then writes only the scratch slot.
        self._copied.synchronize()
        self._set_padding(0, size)
        self._copy_inputs(size)
        inputs = {name: t[:size] for name, t in self.inputs.items()}
        attention = DecodeAttention(inputs["block_tables"], inputs["context_lens"], max_context_len=None)
        args = (inputs["tokens"], inputs["positions"], inputs["slots"], attention, self.logit_rows[:size],
                self.kv_cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: KV transfers may launch work from other threads meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[size] = self.model.forward(*args)
        self._pool = graph.pool()
        self._graphs[size] = graph
