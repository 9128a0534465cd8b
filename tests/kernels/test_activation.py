"""silu_and_mul: the Triton kernel (interpreted) against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.activation import silu_and_mul, silu_and_mul_reference, silu_and_mul_triton


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, intermediate", [(1, 64), (5, 1536), (3, 2500)])  # 2500: a partial tile
def test_matches_reference(num_tokens, intermediate, dtype):
    gate_up = (3 * torch.randn(num_tokens, 2 * intermediate, generator=torch.Generator().manual_seed(0))).to(DEVICE, dtype)
    out = silu_and_mul_triton(gate_up)
    assert out.dtype == dtype and out.shape == (num_tokens, intermediate)
    assert relative_error(out, silu_and_mul_reference(gate_up)) < TOLERANCE[dtype]


def test_reference_is_llama_mlp_activation():
    """act_fn(gate_proj(x)) * up_proj(x), with the halves of the fused projection."""
    gate, up = torch.randn(2, 4, 96, dtype=torch.bfloat16)
    assert torch.equal(silu_and_mul_reference(torch.cat((gate, up), dim=-1)), F.silu(gate) * up)


def test_dispatcher_uses_reference_on_cpu():
    gate_up = torch.randn(3, 128)
    assert torch.equal(silu_and_mul(gate_up), silu_and_mul_reference(gate_up))
