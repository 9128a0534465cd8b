"""Linear layers of a decode step: few rows, every weight streamed once from memory.

Shapes:

    x       [M, K]   bf16/fp16/fp32, K contiguous; M <= MAX_ROWS (16)
    weight  [N, K]   x's dtype, contiguous (the nn.Linear layout)
    bias    [N]      optional
    out     [M, N]   x's dtype:  out = x @ weight.T (+ bias), accumulated in fp32

At M = 1 the weight is read once and used once: the kernel's speed is the rate
at which it streams `weight` from HBM. cuBLAS streams the Llama-3-8B decode
shapes at 2.25-2.8 TB/s on an H100 (copy ceiling ~2.95), worst on the smaller
ones (qkv, o, down); see benchmarks/ENGINE_NOTES.md.

GPU path: each program owns BLOCK_N output columns, i.e. BLOCK_N rows of
`weight`, and walks K in BLOCK_K steps with wide loads, so a launch holds
N / BLOCK_N programs (256 for N = 4096 at BLOCK_N = 16: about two per SM on an
H100's 132) with many bytes in flight each. No split-K: the smallest N of the
target shapes (4096) already fills the SMs, and splitting would need a second
launch or atomics. Two variants (`GemvConfig.use_dot`):

  * FMA: one row of x per program (grid M x N / BLOCK_N, the M programs that
    share a weight tile launched next to each other so the later ones hit L2).
    Each step's products are summed within each thread's 16-byte load and
    accumulated in a [BLOCK_N, BLOCK_K / VEC] fp32 tile (kernels/partial_sums.py),
    reduced once at the end: no cross-thread reduction inside the K loop, and
    few enough registers for many programs per SM.
  * dot: all rows in one program as a 16-row tile (rows past M masked to zero)
    on tensor cores; the weight tile is read once for every row. Needs
    BLOCK_N >= 16.

Configs are fixed per shape (`default_config`), never autotuned at run time:
the launch is captured in CUDA graphs, where autotuning cannot run.
`gemv_triton(..., config=...)` lets a benchmark sweep them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.partial_sums import load_width, partial_sums

MAX_ROWS = 16  # the dot variant's tile height; more rows are a GEMM's job


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output columns (weight rows) per program
    block_k: int  # weight columns per step of the K loop
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop's loads
    use_dot: bool = False  # all rows as one tensor-core tile, else one row per program on FMA units

    def __str__(self) -> str:
        """e.g. fma(8,512,4,3): variant(BLOCK_N, BLOCK_K, num_warps, num_stages)."""
        variant = "dot" if self.use_dot else "fma"
        return f"{variant}({self.block_n},{self.block_k},{self.num_warps},{self.num_stages})"


def default_config(num_rows: int, n: int) -> GemvConfig:
    """The config for an [num_rows, K] x [N, K]^T product. One row: the best total over the 8B and
    A3B decode matrices on an H200 (benchmarks/gemv_variants.py, 2026-12-02: 3.2-4.2 TB/s)."""
    if num_rows == 1:
        return GemvConfig(block_n=4, block_k=2048, num_warps=8, num_stages=3)
    return GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=4, use_dot=True)


# Candidates that benchmarks/engine_speed.py times on each Llama-3-8B decode shape at one row, beside
# default_config (whose one-row tile came from benchmarks/gemv_variants.py's wider study).
SWEEP_CONFIGS = (
    GemvConfig(4, 2048, 8, 3),
    GemvConfig(4, 2048, 4, 3),
    GemvConfig(4, 1024, 4, 3),
    GemvConfig(2, 4096, 4, 3),
    GemvConfig(8, 1024, 4, 3),
    GemvConfig(8, 512, 4, 3),
    GemvConfig(16, 256, 4, 4, use_dot=True),
    GemvConfig(16, 512, 4, 3, use_dot=True),
    GemvConfig(32, 256, 4, 3, use_dot=True),
)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for few rows; Triton on CUDA, F.linear itself elsewhere."""
    if use_triton(x, weight):
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """Launches the kernel; works on any device Triton runs on (the interpreter included)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    assert 1 <= num_rows <= MAX_ROWS, f"gemv takes 1..{MAX_ROWS} rows, got {num_rows}"
    assert weight.shape[1] == k and weight.is_contiguous() and x.stride(-1) == 1
    assert weight.dtype == x.dtype and (bias is None or bias.shape == (n,) and bias.is_contiguous())
    config = config or default_config(num_rows, n)
    assert not config.use_dot or config.block_n >= 16, "tensor-core tiles are at least 16 wide"
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    num_tiles = triton.cdiv(n, config.block_n)
    grid = (num_tiles,) if config.use_dot else (num_rows * num_tiles,)
    block_k = min(config.block_k, max(16, triton.next_power_of_2(k)))  # a short K: no lanes masked off
    _gemv_kernel[grid](
        x, weight, bias, out, num_rows, n, k, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        USE_DOT=config.use_dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        BLOCK_M=MAX_ROWS,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        VEC=min(load_width(weight), block_k),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] contiguous
    bias_ptr,  # [N]; unused without HAS_BIAS
    out_ptr,  # [M, N]
    num_rows,
    n,
    k,
    stride_x,
    stride_out,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,  # FMA: products summed per VEC neighbours before accumulating
):
    pid = tl.program_id(0)
    if USE_DOT:
        tile = pid
        rows = tl.arange(0, BLOCK_M)  # all rows of x, padded to the tile height
    else:  # row-fastest order: the programs sharing a weight tile run side by side
        tile = pid // num_rows
        rows = pid % num_rows + tl.arange(0, 1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    offs_k = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < num_rows, cols < n
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * k + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_k[None, :]  # [rows, BLOCK_K]
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)  # per-thread partial sums
    for start in range(0, k, BLOCK_K):
        k_mask = start + offs_k < k
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            # [BLOCK_N, BLOCK_K] * [1, BLOCK_K], summed per VEC neighbours
            acc += partial_sums(w.to(tl.float32) * x.to(tl.float32), BLOCK_N, BLOCK_K, VEC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if USE_DOT:
        y = acc  # [BLOCK_M, BLOCK_N]
    else:
        y = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
