"""gated_activation (SwiGLU, GeGLU-tanh): the Triton kernel (interpreted) against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.activation import gated_activation, gated_activation_reference, gated_activation_triton


@requires_triton
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, intermediate", [(1, 64), (5, 1536), (3, 2500)])  # 2500: a partial tile
def test_matches_reference(num_tokens, intermediate, dtype, activation):
    gate_up = (3 * torch.randn(num_tokens, 2 * intermediate, generator=torch.Generator().manual_seed(0))).to(DEVICE, dtype)
    out = gated_activation_triton(gate_up, activation)
    assert out.dtype == dtype and out.shape == (num_tokens, intermediate)
    assert relative_error(out, gated_activation_reference(gate_up, activation)) < TOLERANCE[dtype]


def test_reference_is_transformers_mlp_activation():
    """act_fn(gate_proj(x)) * up_proj(x), with the halves of the fused projection (Llama, Gemma 3)."""
    gate, up = torch.randn(2, 4, 96, dtype=torch.bfloat16)
    fused = torch.cat((gate, up), dim=-1)
    assert torch.equal(gated_activation_reference(fused, "silu"), F.silu(gate) * up)
    assert torch.equal(gated_activation_reference(fused, "gelu_tanh"), F.gelu(gate, approximate="tanh") * up)


def test_dispatcher_uses_reference_on_cpu():
    gate_up = torch.randn(3, 128)
    assert torch.equal(gated_activation(gate_up, "gelu_tanh"), gated_activation_reference(gate_up, "gelu_tanh"))


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="relu"):
        gated_activation(torch.randn(2, 8), "relu")
