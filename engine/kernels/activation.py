"""SwiGLU's elementwise half: silu(gate) * up, reading the fused gate_up projection.

Shapes:

    gate_up  [T, 2 * I]   first I columns gate, last I up; bf16/fp16/fp32, last dim contiguous
    out      [T, I]       gate_up's dtype

Numerics match transformers' LlamaMLP, `act_fn(gate_proj(x)) * up_proj(x)`:
silu in fp32 rounded to the input dtype, then the product rounded again.
GPU path: grid (T, I / BLOCK), one tile of one row per program.
"""
import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton

_BLOCK = 1024  # columns per program


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    num_tokens, two_i = gate_up.shape
    assert two_i % 2 == 0 and gate_up.stride(-1) == 1
    intermediate = two_i // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    block = min(_BLOCK, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, intermediate, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    intermediate,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype)  # rounded like the unfused F.silu
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)
