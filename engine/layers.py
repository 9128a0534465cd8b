"""The layers that differ between families: RMSNorm styles, the gated MLP, the MoE block.

Each is a small object holding its weights, called by the one forward pass in
engine/model.py; the loader builds them from the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.activation import gated_activation
from .kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_heads_
from .linear import Linear


@dataclass(frozen=True, eq=False)
class RmsNorm:
    """RMSNorm with weight multiplier (offset + weight): Llama's offset 0, Gemma's 1 (see kernels/rms_norm.py)."""

    weight: torch.Tensor  # [dim]
    eps: float
    offset: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x (in place), then (norm(residual), residual)."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset)

    def heads_(self, x: torch.Tensor) -> None:
        """Normalises each head of x [T, heads, dim] (a view into the fused qkv is fine) in place."""
        rms_norm_heads_(x, self.weight, self.eps, self.offset)


@dataclass(frozen=True, eq=False)
class GatedMlp:
    """down(act(gate(x)) * up(x)), gate and up fused in one projection."""

    gate_up: Linear  # [2 * intermediate, hidden]: gate rows, then up rows
    down: Linear  # [hidden, intermediate]
    activation: str  # "silu" or "gelu_tanh"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gated_activation(self.gate_up(x), self.activation))


@dataclass(frozen=True, eq=False)
class MoeMlp:
    """A sparse MoE block: a router picks top_k experts per token, each a SwiGLU MLP.

    Routing follows Qwen3-MoE and Mixtral: softmax over all experts in fp32, the top_k
    largest, divided by their sum when `renormalize` (Mixtral always, Qwen3-MoE if
    norm_topk_prob): the same as a softmax over the top_k logits.
    """

    router: Linear  # [num_experts, hidden]
    w13: torch.Tensor  # [E, 2 * inter, hidden]: each expert's gate rows, then up rows
    w2: torch.Tensor  # [E, hidden, inter]
    top_k: int
    renormalize: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).float().softmax(dim=-1)  # [T, E]
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts_forward(x, self.w13, self.w2, weights.to(x.dtype), ids)


def experts_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) per token [T, hidden], one expert at a time, in plain torch.

    Stands in for engine/kernels/fused_moe.py's `fused_moe` (same signature) until it lands.
    """
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        rows, slot = (topk_ids == expert).nonzero(as_tuple=True)
        gate_up = x[rows] @ w13[expert].T
        hidden = gated_activation(gate_up, "silu") @ w2[expert].T
        out.index_add_(0, rows, hidden * topk_weights[rows, slot, None])
    return out
