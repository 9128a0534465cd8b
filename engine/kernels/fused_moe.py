"""A mixture-of-experts MLP: each token through its top-k experts' SwiGLU, weighted and summed.

Shapes:

    x             [T, H]        bf16/fp16/fp32, last dim contiguous
    w13           [E, 2 * I, H] x's dtype; per expert the gate rows first, then the up rows
                                (the dense MLP's fused gate_up layout)
    w2            [E, H, I]     x's dtype (down_proj per expert)
    topk_weights  [T, k]        routing weights (any float dtype; used in fp32)
    topk_ids      [T, k]        expert of each (token, slot); distinct within a row, in [0, E)
    out           [T, H]        x's dtype

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

Numerics follow the dense MLP: each projection accumulates in fp32 and is rounded to
the dtype, silu_and_mul rounds like transformers; the weighted expert outputs are
summed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import use_triton
from pdserve.engine.kernels.activation import silu_and_mul_reference


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The MoE MLP; Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x, w13, w2, topk_weights, topk_ids):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)


def _check_shapes(x, w13, w2, topk_weights, topk_ids) -> None:
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    assert w13_hidden == hidden and two_inter % 2 == 0, f"w13 {tuple(w13.shape)} for x {tuple(x.shape)}"
    assert w2.shape == (num_experts, hidden, two_inter // 2), f"w2 {tuple(w2.shape)} for w13 {tuple(w13.shape)}"
    assert w13.dtype == x.dtype and w2.dtype == x.dtype, "weights in x's dtype"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == num_tokens
    assert topk_weights.is_floating_point() and not topk_ids.is_floating_point()


def fused_moe_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Plain torch, one expert at a time over the tokens routed to it (the CPU path and the oracle)."""
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        hidden = silu_and_mul_reference(F.linear(x[tokens], w13[expert]))
        # down_proj accumulated in fp32 and weighted before its one rounding, like the kernel
        down = F.linear(hidden.float(), w2[expert].float()) * topk_weights[tokens, slots].float()[:, None]
        out.index_add_(0, tokens, down.to(x.dtype).float())
    return out.to(x.dtype)


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    raise NotImplementedError("the Triton kernel lands next")
