"""gemv: the Triton kernel (interpreted) against F.linear in float64, both variants."""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.gemv import (
    SWEEP_CONFIGS,
    GemvConfig,
    default_config,
    gemv,
    gemv_triton,
)

FMA = GemvConfig(block_n=8, block_k=64, num_warps=2, num_stages=2)
DOT = GemvConfig(block_n=16, block_k=32, num_warps=2, num_stages=2, use_dot=True)
# (N, K): tiles that fit exactly; N and K past a tile (partial last tile and K step)
SHAPES = [(32, 128), (37, 100), (20, 200)]


def make_inputs(num_rows, n, k, dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, k, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if with_bias else None
    return x, weight, bias


def reference(x, weight, bias):
    """F.linear in float64 on the same (rounded) inputs, rounded to x's dtype once."""
    out = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return out.to(x.dtype)


@requires_triton
@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 8])
@pytest.mark.parametrize("n, k", SHAPES)
def test_matches_float64_linear(n, k, num_rows, with_bias, config):
    x, weight, bias = make_inputs(num_rows, n, k, torch.bfloat16, with_bias)
    out = gemv_triton(x, weight, bias, config)  # `out` starts as NaN: every element must be written
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, n)
    assert relative_error(out, reference(x, weight, bias)) < TOLERANCE[torch.bfloat16]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_other_dtypes(dtype, config):
    """fp32 to 1e-5 (the dot variant must not round inputs to TF32); fp16 like bf16."""
    x, weight, bias = make_inputs(3, 37, 100, dtype, with_bias=True, seed=1)
    out = gemv_triton(x, weight, bias, config)
    assert out.dtype == dtype
    assert relative_error(out, reference(x, weight, bias)) < TOLERANCE.get(dtype, 1e-2)


@requires_triton
def test_default_configs_run():
    """The configs the engine picks, at the smallest shape that uses a whole tile of each."""
    for num_rows in (1, 4):
        config = default_config(num_rows, 64)
        x, weight, _ = make_inputs(num_rows, 64, config.block_k + 16, torch.bfloat16, with_bias=False)
        assert relative_error(gemv_triton(x, weight), reference(x, weight, None)) < TOLERANCE[torch.bfloat16]


@requires_triton
def test_strided_rows_and_too_many_rows():
    """x may be a row-strided view (a slice of a wider activation); more than MAX_ROWS is refused."""
    wide, weight, _ = make_inputs(2, 24, 160, torch.float32, with_bias=False)
    x = wide[:, :80]
    out = gemv_triton(x, weight[:, :80].contiguous(), config=FMA)
    assert relative_error(out, reference(x, weight[:, :80], None)) < 1e-5
    with pytest.raises(AssertionError):
        gemv_triton(torch.zeros(17, 80, device=DEVICE), weight[:, :80].contiguous())


def test_dispatcher_uses_f_linear_off_cuda():
    x, weight, bias = torch.randn(2, 64), torch.randn(16, 64), torch.randn(16)
    assert torch.equal(gemv(x, weight, bias), F.linear(x, weight, bias))


@requires_triton
@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=str)
def test_sweep_configs_are_correct(config):
    """Every config the benchmark may pick, on a shape with partial tiles in N and K."""
    x, weight, bias = make_inputs(1 if not config.use_dot else 3, 40, 1100, torch.bfloat16, with_bias=True)
    out = gemv_triton(x, weight, bias, config)
    assert relative_error(out, reference(x, weight, bias)) < TOLERANCE[torch.bfloat16]
