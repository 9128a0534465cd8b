"""The weight-only FP8 GEMV of decode steps: y = x @ W.T (+ b), W float8_e4m3fn with fp32 scales.

Shapes (as engine/kernels/fp8_gemm.py):

    x        [M, K]  bf16/fp16/fp32, K contiguous; M <= MAX_ROWS (16)
    weight   [N, K]  float8_e4m3fn, contiguous
    w_scale  [ceil(N / group_n), ceil(K / group_k)] fp32: W[i, j] = weight[i, j] * w_scale[i // group_n, j // group_k]
    bias     [N]     optional, x's dtype
    out      [M, N]  x's dtype, accumulated in fp32

A decode step at few rows streams every weight once, so the kernel's speed is the rate at which
it reads one byte per weight. Each program owns BLOCK_N weight rows and walks K in BLOCK_K
steps; a step's weight tile is seen as [BLOCK_N, G, SUB] with SUB = min(BLOCK_K, group_k), so
each SUB-wide slice lies in one scale group. The scales are applied where they cost least:

  * ROW (per-tensor and per-channel checkpoints: one group over all of K): once per output
    after the K loop;
  * FOLD (128 x 128 blocks, BLOCK_N dividing group_n): all of a tile's rows share one scale row,
    so a step loads G scales and multiplies them into the activation slice ([1, G, SUB], tiny),
    never into the weight tile: a block-scaled GEMV does the per-row one's work;
  * GATHER (anything else, e.g. fused projections whose blocks were split to one scale row per
    weight row): a [BLOCK_N, G] scale tile per step, multiplied into the products.

Variants (`Fp8GemvConfig`):
  * FMA: one row of x per program (grid M x N / BLOCK_N), products summed within each thread's
    16-byte load and accumulated in fp32 (kernels/partial_sums.py), reduced once after the loop.
    The weight is widened either by the hardware's FP8 conversion (`bit_dequant` False) or with
    integer ops (`bit_dequant` True): the e4m3 sign and exponent-mantissa bits moved into an
    fp32's, which reads as the value times 2^-120 (normal and subnormal alike); the 2^120 is split
    between the activation (2^60) and the result (2^60) so no product leaves fp32's range. Which
    is faster is a property of the GPU's conversion throughput: benchmarks/fp8_gemv_sweep.py decides.
  * dot: all rows as one 16-row tile on tensor cores, the weight widened to x's dtype (exact:
    every e4m3 value is a bf16 and an fp16); a folded activation is rounded to x's dtype once.

Configs come from `GEMV_DEFAULTS`, keyed by shape class (`shape_class`), never autotuned at run
time: launches are captured in CUDA graphs. The sweep prints a new table to paste.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.fp8_gemm import FP8_DTYPE, dequantize
from pdserve.engine.kernels.gemv import MAX_ROWS
from pdserve.engine.kernels.partial_sums import load_width, partial_sums

ROW, FOLD, GATHER = "row", "fold", "gather"  # where the scales are applied (module docstring)


@dataclass(frozen=True)
class Fp8GemvConfig:
    block_n: int  # weight rows (outputs) per program
    block_k: int  # weight columns per K step (a power of two)
    num_warps: int
    num_stages: int
    use_dot: bool = False
    bit_dequant: bool = False  # FMA only: widen with integer ops instead of the FP8 conversion

    def __str__(self) -> str:
        """e.g. fma(8,1024,4,2), fma-bits(16,1024,4,3), dot(16,256,4,4)."""
        variant = "dot" if self.use_dot else "fma-bits" if self.bit_dequant else "fma"
        return f"{variant}({self.block_n},{self.block_k},{self.num_warps},{self.num_stages})"


def shape_class(num_rows: int, n: int, k: int, block_scales: bool) -> str:
    """The key of `GEMV_DEFAULTS`: scale layout / rows / width / depth, e.g. 'block/m1/wide/shallow'.
    Llama-3-8B: qkv and o are narrow/shallow, gate_up wide/shallow, down narrow/deep."""
    rows = "m1" if num_rows == 1 else "m4" if num_rows <= 4 else "m16"
    width = "wide" if n >= 16384 else "narrow"
    depth = "deep" if k >= 8192 else "shallow"
    return f"{'block' if block_scales else 'row'}/{rows}/{width}/{depth}"


# Paste the table `benchmarks/fp8_gemv_sweep.py` prints over this one. The 16-row entries: its H200 run
# of 2026-12-01. The block one-row entries take the row ones' tile (a 2048-wide step is 16 scale groups).
C = Fp8GemvConfig
GEMV_DEFAULTS: dict[str, Fp8GemvConfig] = {
    # One row: the best total over the 8B and A3B matrices with per-thread partial sums
    # (benchmarks/gemv_variants.py, H200, 2026-12-02: qkv 2.6, o 2.5, gate_up 3.7, down 3.4 TB/s).
    "row/m1/narrow/shallow": C(4, 2048, 4, 1),
    "row/m1/wide/shallow": C(4, 2048, 4, 1),
    "row/m1/narrow/deep": C(4, 2048, 4, 1),
    "row/m1/wide/deep": C(4, 2048, 4, 1),
    "block/m1/narrow/shallow": C(4, 2048, 4, 1),
    "block/m1/wide/shallow": C(4, 2048, 4, 1),
    "block/m1/narrow/deep": C(4, 2048, 4, 1),
    "block/m1/wide/deep": C(4, 2048, 4, 1),
    # Two to four rows: FMA, one program per row (the later rows read the tile from L2). On the H200
    # (2026-12-02, down projections before the partial sums) fma(8,1024,4,2) took the 8B down at 4 rows
    # from 68.1 to 47.2 us and a 5120 x 25600 one from 196.5 to 100.3 us against the 16-row dot tiles.
    # Swept on those narrow/deep shapes only; the other classes take the same tile.
    "row/m4/narrow/shallow": C(8, 1024, 4, 2),
    "row/m4/wide/shallow": C(8, 1024, 4, 2),
    "row/m4/narrow/deep": C(8, 1024, 4, 2),
    "row/m4/wide/deep": C(8, 1024, 4, 2),
    "block/m4/narrow/shallow": C(8, 1024, 4, 2),
    "block/m4/wide/shallow": C(8, 1024, 4, 2),
    "block/m4/narrow/deep": C(8, 1024, 4, 2),
    "block/m4/wide/deep": C(8, 1024, 4, 2),
    "row/m16/narrow/shallow": C(32, 256, 4, 3, use_dot=True),
    "row/m16/wide/shallow": C(64, 256, 4, 3, use_dot=True),
    "row/m16/narrow/deep": C(32, 256, 4, 3, use_dot=True),
    "row/m16/wide/deep": C(32, 128, 4, 4, use_dot=True),
    "block/m16/narrow/shallow": C(32, 256, 4, 3, use_dot=True),
    "block/m16/wide/shallow": C(64, 256, 4, 3, use_dot=True),
    "block/m16/narrow/deep": C(32, 256, 4, 3, use_dot=True),
    "block/m16/wide/deep": C(32, 128, 4, 4, use_dot=True),
}
del C


def default_config(num_rows: int, n: int, k: int, group_k: int) -> Fp8GemvConfig:
    return GEMV_DEFAULTS[shape_class(num_rows, n, k, group_k < k)]


def scale_mode(group_n: int, group_k: int, k: int, block_n: int) -> int:
    if group_k >= k:
        return ROW
    return FOLD if group_n % block_n == 0 else GATHER


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, group_n: int, group_k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) for few rows, W dequantized on load; Triton on CUDA, the exact torch reference elsewhere
    (and for scale groups narrower than 16 or not a power of two, which no checkpoint uses)."""
    k = x.shape[1]
    kernel_groups = group_k >= k or (group_k >= 16 and group_k & (group_k - 1) == 0)
    if use_triton(x, weight) and x.shape[0] <= MAX_ROWS and kernel_groups:
        return fp8_gemv_triton(x, weight, w_scale, group_n, group_k, bias)
    return F.linear(x, dequantize(weight, w_scale, group_n, group_k).to(x.dtype), bias)


def fp8_gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, group_n: int, group_k: int,
    bias: torch.Tensor | None = None, config: Fp8GemvConfig | None = None,
) -> torch.Tensor:
    """Launches the kernel; works on any device Triton runs on (the interpreter included)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    assert 1 <= num_rows <= MAX_ROWS, f"fp8_gemv takes 1..{MAX_ROWS} rows, got {num_rows}"
    assert weight.dtype == FP8_DTYPE and weight.shape[1] == k and weight.is_contiguous() and x.stride(-1) == 1
    assert w_scale.is_contiguous() and (bias is None or bias.shape == (n,) and bias.is_contiguous())
    config = config or default_config(num_rows, n, k, group_k)
    assert not config.use_dot or config.block_n >= 16, "tensor-core tiles are at least 16 wide"
    mode = scale_mode(group_n, group_k, k, config.block_n)
    sub = config.block_k if mode == ROW else min(config.block_k, group_k)
    assert config.block_k % sub == 0 and sub & (sub - 1) == 0, "K steps and scale groups must be powers of two"
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    num_tiles = triton.cdiv(n, config.block_n)
    grid = (num_tiles,) if config.use_dot else (num_rows * num_tiles,)
    # GROUP_K is a constexpr: under ROW it is unused, and 1 spares a compile per K
    _fp8_gemv_kernel[grid](
        x, weight.view(torch.uint8), w_scale, bias, out, num_rows, n, k,
        x.stride(0), w_scale.stride(0), out.stride(0),
        GROUP_N=group_n, GROUP_K=group_k if mode != ROW else 1, SCALES=mode, HAS_BIAS=bias is not None,
        USE_DOT=config.use_dot, BIT_DEQUANT=config.bit_dequant and not config.use_dot,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SUB=sub, VEC=min(load_width(weight), sub),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] the fp8 bytes (uint8), contiguous
    w_scale_ptr,  # [ceil(N / GROUP_N), ceil(K / GROUP_K)] fp32
    bias_ptr,  # [N]; unused without HAS_BIAS
    out_ptr,  # [M, N]
    num_rows, n, k,
    stride_x, stride_ws, stride_out,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    SCALES: tl.constexpr,  # ROW, FOLD or GATHER
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    BIT_DEQUANT: tl.constexpr,
    EVEN_N: tl.constexpr,  # n % BLOCK_N == 0: no row masks
    EVEN_K: tl.constexpr,  # k % BLOCK_K == 0: no column masks
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB: tl.constexpr,  # columns of one K step that share a scale (BLOCK_K under ROW)
    VEC: tl.constexpr,  # FMA: products summed per VEC neighbours (one 16-byte load) before accumulating
):
    G: tl.constexpr = BLOCK_K // SUB
    pid = tl.program_id(0)
    if USE_DOT:
        tile = pid
        rows = tl.arange(0, BLOCK_M)
    else:  # row-fastest order: the programs sharing a weight tile run side by side
        tile = pid // num_rows
        rows = pid % num_rows + tl.arange(0, 1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    offs_g = tl.arange(0, G)
    offs_k = offs_g[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [G, SUB]: column within the step
    row_mask, col_mask = rows < num_rows, cols < n
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None, None] * k + offs_k[None, :, :]  # [BLOCK_N, G, SUB]
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None, None] * stride_x + offs_k[None, :, :]  # [rows, G, SUB]
    s_row = w_scale_ptr + (cols // GROUP_N)[:, None] * stride_ws  # [BLOCK_N, 1]: each row's scale row
    s_tile = w_scale_ptr + (tile * BLOCK_N // GROUP_N) * stride_ws  # FOLD: the tile's one scale row
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        k_mask = start + offs_k < k  # [G, SUB]
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask[:, None, None], other=0)
        else:
            w = tl.load(w_ptrs, mask=col_mask[:, None, None] & k_mask[None, :, :], other=0)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None, None], other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
        if BIT_DEQUANT:
            x = x * 1152921504606846976.0  # 2^60
        if SCALES != "row":  # the step's scales; its group g starts at column start + g * SUB
            g_mask = start + offs_g * SUB < k
            group = (start + offs_g * SUB) // GROUP_K  # [G]
            if SCALES == "fold":
                x = x * tl.load(s_tile + group, mask=g_mask, other=0.0)[None, :, None]
            else:
                s = tl.load(s_row + group[None, :], mask=col_mask[:, None] & g_mask[None, :], other=0.0)  # [BLOCK_N, G]
        if USE_DOT:
            if SCALES == "gather":
                wt = tl.reshape(w.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, :, None], [BLOCK_N, BLOCK_K])
            else:
                wt = tl.reshape(w.to(tl.float8e4nv, bitcast=True), [BLOCK_N, BLOCK_K])
            xt = tl.reshape(x, [BLOCK_M, BLOCK_K]).to(x_ptr.dtype.element_ty)
            acc = tl.dot(xt, tl.trans(wt.to(x_ptr.dtype.element_ty)), acc, input_precision=DOT_PRECISION)
        else:
            if BIT_DEQUANT:  # sign to bit 31, exponent and mantissa to bits 20..26: the value * 2^-120
                b = w.to(tl.uint32)
                wf = (((b & 0x7F) << 20) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
            else:
                wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if SCALES == "gather":
                acc += partial_sums(wf * (x * s[:, :, None]), BLOCK_N, BLOCK_K, VEC)
            else:
                acc += partial_sums(wf * x, BLOCK_N, BLOCK_K, VEC)  # [BLOCK_N, G, SUB] * [1, G, SUB]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if USE_DOT:
        y = acc  # [BLOCK_M, BLOCK_N]
    else:
        y = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        if BIT_DEQUANT:
            y = y * 1152921504606846976.0
    if SCALES == "row":
        y = y * tl.load(w_scale_ptr + (cols // GROUP_N) * stride_ws, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
