"""The accumulator of the streaming kernels (the decode GEMVs, the pair-major MoE): products summed
per thread before they are accumulated.

A kernel that streams a weight once multiplies a [BLOCK_N, BLOCK_K] tile by x each K step. Keeping
every product lane in an fp32 accumulator costs BLOCK_N * BLOCK_K / threads registers, which caps
the programs per SM and so the bytes in flight. Each thread's loads are VEC neighbours along K (one
16-byte load), so summing the step's products over groups of VEC neighbours first is a reduction
inside the thread: the accumulator shrinks VEC times at no cost. On an H200
(benchmarks/gemv_variants.py, 2026-12-02, one row) this took the bf16 8B decode matrices from
2.9-3.5 to 3.2-4.2 TB/s and the FP8 gate_up from 2.9 to 3.7 TB/s, timed alone. Inside the 8B's
decode graph the FP8 GEMV went 2.21 -> 2.03 ms and the bf16 one stayed at 4.05 ms (it already
streamed at ~3.9 TB/s there). The sums stay fp32; only their order changes.

    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], tl.float32)
    acc += partial_sums(w * x, BLOCK_N, BLOCK_K, VEC)   # per K step
    y = tl.sum(acc, axis=1)                             # once, at the end
"""
from __future__ import annotations

import torch

from pdserve.engine.kernels._triton import tl, triton

LOAD_BYTES = 16  # one vectorized load per thread


def load_width(weight: torch.Tensor) -> int:
    """VEC for a weight of this dtype: the elements of one 16-byte load."""
    return LOAD_BYTES // weight.element_size()


@triton.jit
def partial_sums(products, ROWS: tl.constexpr, COLS: tl.constexpr, VEC: tl.constexpr):
    """products [ROWS, COLS] (or any shape of ROWS x COLS elements, COLS the K positions in order) ->
    [ROWS, COLS // VEC]: each VEC consecutive products summed (within a thread)."""
    return tl.sum(tl.reshape(products, [ROWS, COLS // VEC, VEC]), axis=2)
