"""FP8 linear layers: y = x @ W.T (+ b) with W float8_e4m3fn and fp32 scales.

Shapes:

    x        [M, K]  bf16/fp16/fp32, K contiguous
    weight   [N, K]  float8_e4m3fn, contiguous (the nn.Linear layout)
    w_scale  [ceil(N / group_n), ceil(K / group_k)] fp32: W[i, j] = weight[i, j] * w_scale[i // group_n, j // group_k]
    bias     [N]     optional, x's dtype
    out      [M, N]  x's dtype, accumulated in fp32

Two scale layouts reach the kernels: per row (group_n 1, group_k >= K: per-tensor and
per-channel checkpoints) and blocks (128 x 128 in Qwen3-FP8 and DeepSeek).

`fp8_matmul` (prefill, large decode batches): the activation is quantized to FP8
dynamically, per token over groups of `group_k` columns (one group per row for
per-row weights), and both operands go through the FP8 tensor cores:
  * per-row weights on CUDA: `torch._scaled_mm` with rowwise scales (cuBLASLt);
  * 128 x 128 blocks past 64 rows on Hopper: `torch._scaled_mm` in cuBLASLt's block mode (1 x 128
    activation scales), for each weight shape on which a first eager call agreed with the kernel below;
  * other blocks (or what cuBLASLt refuses): `_fp8_gemm_kernel`, grid over
    [BLOCK_M, BLOCK_N] output tiles, walking K in BLOCK_K <= group_k steps; each
    step's FP8 dot product is scaled by its token scales and weight block scale
    before it joins the fp32 accumulator (a per-row layout scales once at the end).
The weight-only GEMV of decode steps is engine/kernels/fp8_gemv.py.
Off CUDA `fp8_matmul` dispatches to torch references with the same numerics (fp32 math on
the dequantized operands).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton

_log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero group still gets a finite scale


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        """e.g. tile(128,128,128,8,3): (block_m, block_n, block_k, num_warps, num_stages)."""
        return f"tile({self.block_m},{self.block_n},{self.block_k},{self.num_warps},{self.num_stages})"


def default_gemm_config(num_rows: int, k: int, group_k: int) -> Fp8GemmConfig:
    """Fixed per shape (the launch is captured in CUDA graphs, where autotuning cannot run). From
    benchmarks/fp8_gemm_sweep.py on an H200, 2026-12-02, Llama-3-8B projections, 128 x 128 blocks:
    64 rows tile(64,64,128,4,4) 125 us for the four (was tile(64,128,128,4,3): 158); 2048 rows
    tile(64,128,128,4,4) 1368 us (was tile(128,128,128,8,3): 1436; cuBLAS per-tensor FP8: 672)."""
    block_k = min(128, group_k, triton.next_power_of_2(k)) if group_k < k else min(128, triton.next_power_of_2(k))
    if num_rows > 64:
        return Fp8GemmConfig(64, 128, block_k, num_warps=4, num_stages=4)
    return Fp8GemmConfig(max(16, triton.next_power_of_2(num_rows)), 64, block_k, num_warps=4, num_stages=4)


# -- activation quantization ------------------------------------------------------------------

def quantize_per_token_group(x: torch.Tensor, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, ceil(K / group_k)] fp32) with x ~= q * scale."""
    m, k = x.shape
    groups = -(-k // group_k)
    padded = F.pad(x.float(), (0, groups * group_k - k)).view(m, groups, group_k)
    scale = padded.abs().amax(-1).clamp(min=MIN_SCALE) / FP8_MAX  # [M, groups]
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, groups * group_k)
    return q[:, :k].contiguous(), scale


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] / input_scale (a checkpoint's static scale, [1]) -> the same (q, scale [M, groups]) as above."""
    m, k = x.shape
    q = (x.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, input_scale.float().reshape(1, 1).expand(m, -(-k // group_k)).contiguous()


def quantize_activation(x: torch.Tensor, group_k: int, input_scale: torch.Tensor | None,
                        scales_outer_major: bool = False):
    """Dynamic per token (and group) without a static scale, else static: one Triton pass on CUDA
    (the torch references above take a dozen, each a launch and a trip through x).
    `scales_outer_major`: the scales [M, groups] laid out with stride (1, M), as cuBLASLt's block mode reads them."""
    if use_triton(x):
        return quantize_triton(x, group_k, input_scale, scales_outer_major)
    return quantize_per_token_group(x, group_k) if input_scale is None else quantize_static(x, input_scale, group_k)


def quantize_triton(x: torch.Tensor, group_k: int, input_scale: torch.Tensor | None = None,
                    scales_outer_major: bool = False):
    """The references' numerics in one kernel, a program per (row, group); any device Triton runs on."""
    m, k = x.shape
    assert x.stride(-1) == 1, "x must be contiguous along K"
    groups = -(-k // group_k)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    if scales_outer_major:
        scale = torch.empty((groups, m), dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(min(group_k, k))
    static = input_scale.float().reshape(1) if input_scale is not None else scale  # unused without STATIC
    _quantize_kernel[(m, groups)](
        x, q.view(torch.uint8), scale, static, k, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1),
        GROUP_K=group_k, BLOCK=block, STATIC=input_scale is not None, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
        num_warps=8 if block >= 4096 else 4,
    )
    return q, scale


@triton.jit
def _quantize_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] the fp8 bytes (uint8)
    scale_ptr,  # [M, ceil(K / GROUP_K)] fp32
    static_ptr,  # [1] fp32: the checkpoint's input scale (STATIC)
    k, stride_x, stride_q, stride_s, stride_sg,
    GROUP_K: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two of min(GROUP_K, K)
    STATIC: tl.constexpr,
    FP8_MAX: tl.constexpr,  # the module's (a kernel reads no globals)
    MIN_SCALE: tl.constexpr,
):
    row, group = tl.program_id(0), tl.program_id(1)
    cols = group * GROUP_K + tl.arange(0, BLOCK)
    mask = (cols < k) & (tl.arange(0, BLOCK) < GROUP_K)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr)
    else:  # IEEE divisions, as torch's: the same fp8 bytes as the reference
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), MIN_SCALE), FP8_MAX)
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    tl.store(q_ptr + row.to(tl.int64) * stride_q + cols, q.to(tl.uint8, bitcast=True), mask=mask)
    tl.store(scale_ptr + row * stride_s + group * stride_sg, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_n: int, group_k: int) -> torch.Tensor:
    """q [R, K] * scale[r // group_n, j // group_k], in fp32."""
    rows, k = q.shape
    full = scale.float().repeat_interleave(group_n, 0)[:rows].repeat_interleave(group_k, 1)[:, :k]
    return q.float() * full


# -- GEMM ---------------------------------------------------------------------------------------

def fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, group_n: int, group_k: int,
    bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) with x quantized to FP8: per token (and group_k group), or by a static `input_scale`."""
    k = x.shape[1]
    act_group = min(group_k, k)
    if not use_triton(x, weight):
        return fp8_matmul_reference(x, weight, w_scale, group_n, group_k, bias, input_scale)
    if _blockwise_fits(x, weight, group_n, group_k):
        return _blockwise_matmul(x, weight, w_scale, bias, input_scale)
    q, x_scale = quantize_activation(x, act_group, input_scale)
    if _scaled_mm_fits(weight, group_n, group_k):
        out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)
        return out if bias is None else out.add_(bias)
    return fp8_gemm_triton(q, x_scale, weight, w_scale, group_n, group_k, bias, x.dtype)


def blockwise_scaled_mm(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt's block-scaled FP8 GEMM: q [M, K] with 1 x 128 scales [M, K/128] outer-dim-major
    (stride (1, M)), weight [N, K] with 128 x 128 scales [N/128, K/128], passed transposed with it."""
    return torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=out_dtype)


def _blockwise_matmul(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      input_scale: torch.Tensor | None) -> torch.Tensor:
    """cuBLASLt's block mode takes rows in multiples of 16: x is padded to them and the output cut back."""
    m = x.shape[0]
    padded = F.pad(x, (0, 0, 0, -m % 16)) if m % 16 else x
    q, x_scale = quantize_activation(padded, 128, input_scale, scales_outer_major=True)
    out = blockwise_scaled_mm(q, x_scale, weight, w_scale, x.dtype)[:m]
    return out if bias is None else out.add_(bias)


def _blockwise_fits(x: torch.Tensor, weight: torch.Tensor, group_n: int, group_k: int) -> bool:
    """128 x 128 blocks, more than 64 rows, on a GPU whose cuBLASLt multiplies this shape right (Hopper:
    1.8-2x the Triton kernel at 512+ rows, equal at 64: benchmarks/fp8_blockwise_mm.py, H200, 2026-12-02)."""
    n, k = weight.shape
    return ((group_n, group_k) == (128, 128) and x.shape[0] > 64 and n % 128 == 0 and k % 128 == 0
            and _cublas_blockwise_works(x.device, n, k))


# (device, N, K) -> whether cuBLASLt's block mode agreed with the Triton kernel on that weight shape
_BLOCKWISE_WORKS: dict[tuple[torch.device, int, int], bool] = {}


def _cublas_blockwise_works(device: torch.device, n: int, k: int) -> bool:
    """Tried once per weight shape, eagerly, against the Triton kernel: a torch without the block mode
    raises, and on small grids (a 2 x 2 one, H200 2026-12-02) cuBLASLt answered wrong. Never tried
    inside a CUDA graph's capture: that call takes the Triton kernel."""
    key = (device, n, k)
    if key not in _BLOCKWISE_WORKS:
        if torch.cuda.is_current_stream_capturing():
            return False
        _BLOCKWISE_WORKS[key] = _try_blockwise(device, n, k)
    return _BLOCKWISE_WORKS[key]


def _try_blockwise(device: torch.device, n: int, k: int) -> bool:
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, k, generator=gen, device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device=device) / 16).to(FP8_DTYPE)
    w_scale = torch.rand(n // 128, k // 128, generator=gen, device=device) + 0.5
    try:
        q, x_scale = quantize_triton(x, 128, scales_outer_major=True)
        out = blockwise_scaled_mm(q, x_scale, w, w_scale, torch.bfloat16).float()
    except (RuntimeError, NotImplementedError) as error:
        _log.warning("block-scaled FP8 GEMMs of %d x %d take the Triton kernel: cuBLASLt refused (%s)", n, k, error)
        return False
    q, x_scale = quantize_triton(x, 128)
    expected = fp8_gemm_triton(q, x_scale, w, w_scale, 128, 128, None, torch.bfloat16).float()
    error = ((out - expected).norm() / expected.norm()).item()
    if error >= 1e-2:
        _log.warning("block-scaled FP8 GEMMs of %d x %d take the Triton kernel: cuBLASLt is %.2g off it", n, k, error)
    return error < 1e-2


def _scaled_mm_fits(weight: torch.Tensor, group_n: int, group_k: int) -> bool:
    """cuBLASLt's rowwise FP8 GEMM: one scale per row, both dimensions multiples of 16."""
    n, k = weight.shape
    return group_n == 1 and group_k >= k and n % 16 == 0 and k % 16 == 0


def fp8_matmul_reference(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, group_n: int, group_k: int,
    bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same numerics in fp32 torch: the quantized activation times the dequantized weight."""
    q, x_scale = quantize_activation(x, min(group_k, x.shape[1]), input_scale)
    a = dequantize(q, x_scale, 1, min(group_k, x.shape[1]))
    out = a @ dequantize(weight, w_scale, group_n, group_k).t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def fp8_gemm_triton(
    q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
    group_n: int, group_k: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
    config: Fp8GemmConfig | None = None,
) -> torch.Tensor:
    """Launches the block-scaled GEMM on an already quantized activation (any device Triton runs on)."""
    m, k = q.shape
    n = weight.shape[0]
    assert q.dtype == FP8_DTYPE and weight.dtype == FP8_DTYPE and weight.shape[1] == k
    assert q.stride(-1) == 1 and weight.is_contiguous() and w_scale.is_contiguous() and x_scale.stride(-1) == 1
    config = config or default_gemm_config(m, k, group_k)
    per_row = group_k >= k
    assert per_row or group_k % config.block_k == 0, "a K step must lie inside one scale group"
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        q, x_scale, weight, w_scale, bias, out, m, n, k,
        q.stride(0), x_scale.stride(0), w_scale.stride(0), out.stride(0),
        GROUP_N=group_n, GROUP_K=group_k, PER_ROW=per_row, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWIZZLE=8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # [M, K] fp8
    a_scale_ptr,  # [M, ceil(K / GROUP_K)] fp32 (one column when PER_ROW)
    w_ptr,  # [N, K] fp8, contiguous
    w_scale_ptr,  # [ceil(N / GROUP_N), ceil(K / GROUP_K)] fp32
    bias_ptr,  # [N]; unused without HAS_BIAS
    out_ptr,  # [M, N]
    m, n, k,
    stride_a, stride_as, stride_ws, stride_out,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    PER_ROW: tl.constexpr,  # one scale per row of a and of w: apply once after the K loop
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr,  # row tiles per group of the launch order, so neighbours share W tiles in L2
):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
    per_group = SWIZZLE * tiles_n
    first_m = (pid // per_group) * SWIZZLE
    size_m = tl.minimum(tiles_m - first_m, SWIZZLE)
    tile_m = first_m + (pid % per_group) % size_m
    tile_n = (pid % per_group) // size_m

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < m, cols < n
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * k + offs_k[None, :]
    a_scales = a_scale_ptr + rows * stride_as  # [BLOCK_M] pointers to each row's first group
    w_scales = w_scale_ptr + (cols // GROUP_N) * stride_ws
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        k_mask = start + offs_k < k
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if PER_ROW:
            acc = tl.dot(a, tl.trans(w), acc)
        else:
            group = start // GROUP_K
            s_a = tl.load(a_scales + group, mask=row_mask, other=0.0)
            s_w = tl.load(w_scales + group, mask=col_mask, other=0.0)
            acc += tl.dot(a, tl.trans(w)) * s_a[:, None] * s_w[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PER_ROW:
        acc = acc * tl.load(a_scales, mask=row_mask, other=0.0)[:, None]
        acc = acc * tl.load(w_scales, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
