"""The weight-only FP8 GEMV (engine/kernels/fp8_gemv.py), interpreted on the CPU, against F.linear on the
dequantized weight in float64.

Weight-only means the only roundings are the fp32 accumulation and the output's bf16 (and, on
tensor cores, a block-scaled activation rounded to bf16 once): so within bf16 rounding of the
dequantized product. Shapes follow the checkpoints' 128 x 128 blocks with dimensions that are not
multiples of 128 (partial edge blocks, K not a multiple of the K step), every scale mode (ROW,
FOLD, GATHER) and both widenings of the FMA variant.
"""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, relative_error, requires_triton
from pdserve.engine.kernels.fp8_gemm import FP8_DTYPE, dequantize
from pdserve.engine.kernels.fp8_gemv import (
    FOLD, GATHER, GEMV_DEFAULTS, ROW, Fp8GemvConfig, fp8_gemv, fp8_gemv_triton, scale_mode, shape_class,
)

BF16_OUTPUT_TOL = 4e-3  # bf16 keeps 8 bits: 2^-9 relative per output, RMS well below
# (N, K, group_n, group_k): 128 x 128 blocks with partial edges; one scale per row; blocks split to rows
LAYOUTS = {
    "block-200x300": (200, 300, 128, 128),
    "block-384x640": (384, 640, 128, 128),
    "row-200x300": (200, 300, 1, 300),
    "rowgroups-136x520": (136, 520, 1, 128),  # a fused q|k|v whose blocks were split per row: GATHER
}
CONFIGS = [
    Fp8GemvConfig(8, 256, 2, 1),  # a step of two scale groups
    Fp8GemvConfig(16, 64, 2, 1),  # half a scale group per step
    Fp8GemvConfig(8, 256, 2, 1, bit_dequant=True),
    Fp8GemvConfig(16, 256, 2, 1, use_dot=True),
    Fp8GemvConfig(32, 64, 2, 1, use_dot=True),
]


def quantized_weight(n, k, group_n, group_k, seed=0):
    """A weight in the checkpoint layout whose scale blocks differ in magnitude (x1/16..x16), so a
    scale applied to the wrong block shows."""
    gen = torch.Generator().manual_seed(seed)
    grid = (-(-n // group_n), -(-k // group_k))
    magnitude = 2.0 ** torch.randint(-4, 5, grid, generator=gen).float()
    full = magnitude.repeat_interleave(group_n, 0)[:n].repeat_interleave(group_k, 1)[:, :k]
    weight = torch.randn(n, k, generator=gen) * full / k ** 0.5
    padded = F.pad(weight, (0, grid[1] * group_k - k, 0, grid[0] * group_n - n))
    scale = padded.view(grid[0], group_n, grid[1], group_k).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full_scale = scale.repeat_interleave(group_n, 0)[:n].repeat_interleave(group_k, 1)[:, :k]
    return (weight / full_scale).to(FP8_DTYPE).to(DEVICE), scale.to(DEVICE)


def reference(x, weight, scale, group_n, group_k, bias):
    return F.linear(x.double(), dequantize(weight, scale, group_n, group_k).double(), bias.double())


@requires_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_is_within_bf16_rounding_of_the_dequantized_product(layout, config, m):
    n, k, group_n, group_k = LAYOUTS[layout]
    weight, scale = quantized_weight(n, k, group_n, group_k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n).to(DEVICE, torch.bfloat16)
    out = fp8_gemv_triton(x, weight, scale, group_n, group_k, bias, config)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert relative_error(out, reference(x, weight, scale, group_n, group_k, bias)) < BF16_OUTPUT_TOL


def test_the_layouts_cover_every_scale_mode():
    modes = {scale_mode(gn, gk, k, 8) for _, k, gn, gk in LAYOUTS.values()}
    assert modes == {ROW, FOLD, GATHER}


@requires_triton
@pytest.mark.parametrize("layout", ["block-384x640", "row-200x300", "rowgroups-136x520"])
def test_integer_widening_gives_the_conversions_bits(layout):
    """bits * 2^-120, rescaled by 2^60 twice, is the e4m3 value exactly (subnormals included)."""
    n, k, group_n, group_k = LAYOUTS[layout]
    weight, scale = quantized_weight(n, k, group_n, group_k)
    weight.view(torch.uint8)[:, :8] = torch.arange(8, dtype=torch.uint8)  # zero and subnormals
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float32)
    cvt = fp8_gemv_triton(x, weight, scale, group_n, group_k, config=Fp8GemvConfig(8, 128, 2, 1))
    bits = fp8_gemv_triton(x, weight, scale, group_n, group_k, config=Fp8GemvConfig(8, 128, 2, 1, bit_dequant=True))
    assert torch.equal(cvt, bits)
    assert relative_error(cvt, F.linear(x.double(), dequantize(weight, scale, group_n, group_k).double())) < 1e-6


@requires_triton
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("group", [(128, 128), (1, 1024)], ids=["block", "row"])
def test_default_configs_at_a_realistic_shape(m, group):
    """The table's configs (K steps of 1,024) on a [520, 1,032] weight: neither dimension a multiple of a tile."""
    n, k = 520, 1032
    group_n, group_k = group if group[0] > 1 else (1, k)
    weight, scale = quantized_weight(n, k, group_n, group_k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n).to(DEVICE, torch.bfloat16)
    out = fp8_gemv_triton(x, weight, scale, group_n, group_k, bias)
    assert relative_error(out, reference(x, weight, scale, group_n, group_k, bias)) < BF16_OUTPUT_TOL


def test_every_shape_class_has_a_default():
    for rows in (1, 3, 8):
        for n, k in ((4096, 4096), (28672, 4096), (4096, 14336), (16384, 16384)):
            for block in (False, True):
                assert shape_class(rows, n, k, block) in GEMV_DEFAULTS


def test_off_cuda_it_is_the_dequantized_linear():
    weight, scale = quantized_weight(40, 96, 32, 32)
    x = torch.randn(2, 96)
    out = fp8_gemv(x, weight.cpu(), scale.cpu(), 32, 32)
    assert torch.allclose(out, F.linear(x, dequantize(weight.cpu(), scale.cpu(), 32, 32)))
