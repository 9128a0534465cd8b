"""FP8 GEMM: the Triton kernel (interpreted on the CPU) against torch references.

The GEMM quantizes the activation, so its reference is the same quantized activation
times the dequantized weight in float64 (the weight-only GEMV: test_fp8_gemv.py).
"""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, relative_error, requires_triton
from pdserve.engine.kernels.fp8_gemm import (
    FP8_DTYPE,
    Fp8GemmConfig,
    dequantize,
    fp8_gemm_triton,
    fp8_matmul,
    fp8_matmul_reference,
    quantize_per_token_group,
    quantize_static,
    quantize_triton,
)

# (N, K, group_n, group_k): blocks that tile exactly, blocks with partial edges, one scale per row
LAYOUTS = [(64, 64, 32, 32), (40, 100, 32, 32), (48, 96, 1, 96)]
SMALL_GEMM = Fp8GemmConfig(block_m=16, block_n=32, block_k=32, num_warps=2, num_stages=1)


def quantized_weight(n, k, group_n, group_k, seed=0):
    """A random weight in the checkpoint layout: fp8 values and their scale grid."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    grid = (-(-n // group_n), -(-k // group_k))
    padded = F.pad(weight, (0, grid[1] * group_k - k, 0, grid[0] * group_n - n))
    blocks = padded.view(grid[0], group_n, grid[1], group_k)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [grid_n, grid_k]
    full = scale.repeat_interleave(group_n, 0)[:n].repeat_interleave(group_k, 1)[:, :k]
    return (weight / full).to(FP8_DTYPE).to(DEVICE), scale.to(DEVICE)


def activation(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@requires_triton
@pytest.mark.parametrize("n, k, group_n, group_k", LAYOUTS)
@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gemm_matches_quantized_reference(n, k, group_n, group_k, m, with_bias):
    weight, scale = quantized_weight(n, k, group_n, group_k)
    x = activation(m, k, torch.bfloat16)
    bias = torch.randn(n).to(DEVICE, torch.bfloat16) if with_bias else None
    q, x_scale = quantize_per_token_group(x, min(group_k, k))
    out = fp8_gemm_triton(q, x_scale, weight, scale, group_n, group_k, bias, torch.bfloat16, SMALL_GEMM)
    ref = dequantize(q, x_scale, 1, min(group_k, k)).double() @ dequantize(weight, scale, group_n, group_k).double().t()
    if bias is not None:
        ref += bias.double()
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2  # bf16 output rounding


@requires_triton
@pytest.mark.parametrize("m, k, group_k", [(3, 96, 96), (5, 300, 128), (2, 4096, 128), (1, 14336, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_one_pass_quantization_writes_the_references_bytes(m, k, group_k, dtype):
    """Per row and per group, partial last groups, a row wider than 8k: q and scales equal the torch reference's."""
    x = activation(m, k, dtype) * torch.logspace(-2, 2, k).to(DEVICE, dtype)  # groups of different magnitudes
    x[0, : min(group_k, k)] = 0  # an all-zero group keeps a finite scale
    q, scale = quantize_triton(x, group_k)
    ref_q, ref_scale = quantize_per_token_group(x.cpu(), group_k)
    assert q.dtype == FP8_DTYPE and scale.shape == ref_scale.shape
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))


@requires_triton
def test_outer_major_scales_hold_the_same_values():
    """cuBLASLt's block mode reads the activation scales with stride (1, M): same values, that layout."""
    x = activation(5, 300, torch.bfloat16)
    q, scale = quantize_triton(x, 128, scales_outer_major=True)
    ref_q, ref_scale = quantize_triton(x, 128)
    assert scale.shape == (5, 3) and scale.stride() == (1, 5)
    assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="cuBLASLt's block-scaled FP8 GEMM runs on Hopper")
@pytest.mark.parametrize("m", [1, 65, 512])
def test_block_scaled_matmul_takes_cublas_on_hopper_and_agrees(m):
    """128 x 128 blocks: past 64 rows fp8_matmul goes to cuBLASLt (padding rows to 16s), within FP8
    rounding of the reference."""
    from pdserve.engine.kernels import fp8_gemm
    weight, scale = quantized_weight(2048, 1024, 128, 128)
    x = activation(m, 1024, torch.bfloat16)
    assert fp8_gemm._blockwise_fits(x, weight, 128, 128) == (m > 64)
    out = fp8_matmul(x, weight, scale, 128, 128)
    assert relative_error(out, fp8_matmul_reference(x, weight, scale, 128, 128)) < 1e-2


@requires_triton
def test_the_one_pass_quantization_takes_a_static_scale():
    x = activation(4, 96, torch.bfloat16) * 30  # some past 448 * 0.05: clipped
    s = torch.tensor([0.05])
    q, scale = quantize_triton(x, 96, s.to(DEVICE))
    ref_q, ref_scale = quantize_static(x.cpu(), s, 96)
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))


def test_quantization_error_is_fp8_sized():
    """Per-token-group quantization keeps every value to e4m3's 3 mantissa bits (relative 2^-4)."""
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 300)  # groups of very different magnitudes
    q, scale = quantize_per_token_group(x, 128)
    assert q.dtype == FP8_DTYPE and scale.shape == (5, 3)
    back = dequantize(q, scale, 1, 128)
    big = x.abs() > x.abs().view(5, -1).amax(-1, keepdim=True) * 2 ** -6  # normal range of the group
    rel = ((back - x).abs() / x.abs())[big[:, :300]]
    assert rel.max() <= 2 ** -4 + 1e-6


def test_a_static_input_scale_quantizes_x_by_it():
    """`activation_scheme: static`: q = x / input_scale (clamped to e4m3's range), one scale for every token."""
    weight, scale = quantized_weight(48, 96, 1, 96)
    weight, scale = weight.cpu(), scale.cpu()
    x = torch.randn(5, 96)
    x[0, 0] = 100.0  # past 448 * 0.05: clipped
    s = torch.tensor([0.05])
    q = (x / s).clamp(-448, 448).to(FP8_DTYPE).float() * s
    expected = F.linear(q, dequantize(weight, scale, 1, 96))
    out = fp8_matmul(x, weight, scale, 1, 96, input_scale=s)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert relative_error(out, fp8_matmul(x, weight, scale, 1, 96)) > 1e-3  # not the dynamic path


def test_reference_is_close_to_the_unquantized_product():
    """The FP8 product stays within FP8's error of the dense one (both operands quantized)."""
    weight, scale = quantized_weight(64, 128, 32, 32)
    x = torch.randn(4, 128)
    dense = F.linear(x, dequantize(weight.cpu(), scale.cpu(), 32, 32))
    assert relative_error(fp8_matmul_reference(x, weight.cpu(), scale.cpu(), 32, 32), dense) < 0.05


def test_per_row_matmul_on_scaled_mm_matches_reference():
    """The per-row layout's path: torch._scaled_mm against the reference (on CUDA where there is one:
    older torch builds take only per-tensor scales on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight, scale = quantized_weight(48, 96, 1, 96)
    weight, scale = weight.to(device), scale.to(device)
    x = torch.randn(7, 96, device=device).bfloat16()
    q, x_scale = quantize_per_token_group(x, 96)
    out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)
    assert relative_error(out, fp8_matmul_reference(x, weight, scale, 1, 96)) < 1e-2
    if device == "cpu":  # there fp8_matmul is the reference itself
        assert torch.equal(fp8_matmul(x, weight, scale, 1, 96), fp8_matmul_reference(x, weight, scale, 1, 96))
