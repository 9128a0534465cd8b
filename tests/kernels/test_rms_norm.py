"""rms_norm, add_rms_norm and rms_norm_heads_: the Triton kernel (interpreted) against the torch
reference, and the reference against transformers' LlamaRMSNorm and Gemma3RMSNorm numerics."""
import pytest
import torch

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.rms_norm import (
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_heads_,
    rms_norm_heads_triton_,
    rms_norm_reference,
    rms_norm_triton,
)

SHAPES = [(1, 64), (7, 576), (3, 5, 1000)]  # one row; SmolLM2's hidden; 3-d, not a power of two


def make_inputs(shape, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x.to(device), residual.to(device), weight.to(device)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma3RMSNorm.forward, verbatim."""
    output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, offset):
    x, _, weight = make_inputs(shape, dtype)
    out = rms_norm_triton(x, weight, 1e-5, offset)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, rms_norm_reference(x, weight, 1e-5, offset)) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_reference(shape, dtype, offset):
    x, residual, weight = make_inputs(shape, dtype)
    ref_residual = residual.clone()
    ref_normed, _ = add_rms_norm_reference(x, ref_residual, weight, 1e-6, offset)
    normed, new_residual = add_rms_norm_triton(x, residual, weight, 1e-6, offset)
    assert new_residual.data_ptr() == residual.data_ptr(), "residual is updated in place"
    assert torch.equal(new_residual, ref_residual)  # one rounded add either way
    assert relative_error(normed, ref_normed) < TOLERANCE[dtype]


def test_reference_is_llama_rms_norm_bit_for_bit():
    x, _, weight = make_inputs((4, 576), torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, weight, 1e-5), llama_rms_norm(x, weight, 1e-5))


def test_add_reference_is_residual_add_then_norm():
    x, residual, weight = make_inputs((4, 576), torch.bfloat16)
    expected_residual = residual + x
    normed, new_residual = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(normed, llama_rms_norm(expected_residual, weight, 1e-5))


def test_dispatcher_uses_reference_on_cpu():
    x, _, weight = make_inputs((2, 64), torch.float32, device="cpu")
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heads_norm_in_place_on_a_view_of_qkv(dtype, offset):
    """q and k heads normalised where they sit in the fused qkv; v untouched."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (4 + 2 * 2) * 48, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=gen)).to(DEVICE, dtype)
    before = qkv.clone()
    q, k = qkv[:, :192].view(5, 4, 48), qkv[:, 192:288].view(5, 2, 48)
    rms_norm_heads_triton_(q, weight, 1e-6, offset)
    rms_norm_heads_triton_(k, weight, 1e-6, offset)
    for rows, heads in ((slice(0, 192), 4), (slice(192, 288), 2)):
        expected = rms_norm_reference(before[:, rows].view(5, heads, 48), weight, 1e-6, offset)
        assert relative_error(qkv[:, rows].view(5, heads, 48), expected) < TOLERANCE[dtype]
    assert torch.equal(qkv[:, 288:], before[:, 288:])


def test_heads_reference_on_cpu_is_in_place():
    x = torch.randn(3, 4, 32)
    weight = torch.randn(32)
    expected = rms_norm_reference(x, weight, 1e-6, 1.0)
    rms_norm_heads_(x, weight, 1e-6, 1.0)
    assert torch.equal(x, expected)


def test_reference_with_offset_is_gemma_rms_norm_bit_for_bit():
    x, _, weight = make_inputs((4, 576), torch.bfloat16)
    weight = weight - 1  # Gemma's weights sit around 0
    assert torch.equal(rms_norm_reference(x, weight, 1e-6, 1.0), gemma_rms_norm(x, weight, 1e-6))
