"""The gated MLP's elementwise half: act(gate) * up, reading the fused gate_up projection.

Shapes:

    gate_up  [T, 2 * I]   first I columns gate, last I up; bf16/fp16/fp32, last dim contiguous
    out      [T, I]       gate_up's dtype

Activations: "silu" (SwiGLU: Llama, Qwen, Mistral, the MoE experts) and
"gelu_tanh" (GeGLU with the tanh approximation of GELU: Gemma 3's
gelu_pytorch_tanh). Numerics match transformers' `act_fn(gate_proj(x)) * up_proj(x)`:
the activation in fp32 rounded to the input dtype, then the product rounded again.
GPU path: grid (T, I / BLOCK), one tile of one row per program.
"""
import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton

_BLOCK = 1024  # columns per program
ACTIVATIONS = ("silu", "gelu_tanh")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    if use_triton(gate_up):
        return gated_activation_triton(gate_up, activation)
    return gated_activation_reference(gate_up, activation)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return gated_activation(gate_up, "silu")


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")


def gated_activation_triton(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    num_tokens, two_i = gate_up.shape
    assert two_i % 2 == 0 and gate_up.stride(-1) == 1
    assert activation in ACTIVATIONS, f"activation {activation!r} is not one of {ACTIVATIONS}"
    intermediate = two_i // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    block = min(_BLOCK, triton.next_power_of_2(intermediate))
    _gated_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, intermediate, gate_up.stride(0), out.stride(0),
        GELU_TANH=activation == "gelu_tanh", BLOCK=block, num_warps=4,
    )
    return out


@triton.jit
def _gated_kernel(
    gate_up_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    intermediate,
    stride_in,
    stride_out,
    GELU_TANH: tl.constexpr,  # else silu
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU_TANH:
        # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g³))); tanh(u) = 2 sigmoid(2u) - 1
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * tl.sigmoid(2.0 * inner)
    else:
        act = g * tl.sigmoid(g)
    act = act.to(gate.dtype)  # rounded like the unfused activation
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)
