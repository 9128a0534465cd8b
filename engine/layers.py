"""The layers that differ between families: RMSNorm styles, the gated MLP, the MoE block.

Each is a small object holding its weights, called by the one forward pass in
engine/model.py; the loader builds them from the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.activation import gated_activation
from .kernels.fused_moe import fused_moe
from .kernels.moe_routing import route, route_grouped
from .kernels.rms_norm import add_rms_norm, rms_norm
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
    norm_topk_prob): the same as a softmax over the top_k logits. On CUDA the block is
    the router GEMV, one routing kernel, and fused_moe's launches (two at decode sizes).
    """

    router: Linear  # [num_experts, hidden]
    w13: torch.Tensor  # [E, 2 * inter, hidden]: each expert's gate rows, then up rows
    w2: torch.Tensor  # [E, hidden, inter]
    top_k: int
    renormalize: bool
    shared: SharedExpert | None = None
    grouped: GroupedRouting | None = None  # DeepSeek-V3 / GLM-4.5 routing instead of the softmax's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self._route(x)  # [T, k] each
        out = fused_moe(x, self.w13, self.w2, weights, ids)
        return out if self.shared is None else out.add_(self.shared(x))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grouped is None:
            return route(self.router(x), self.top_k, self.renormalize)
        g = self.grouped  # its router runs in fp32, as the checkpoints' reference code does
        logits = F.linear(x.float(), self.router.weight)
        return route_grouped(logits, g.bias, self.top_k, g.num_groups, g.topk_groups, self.renormalize, g.scaling)


@dataclass(frozen=True, eq=False)
class GroupedRouting:
    """The settings of kernels/moe_routing.py's `route_grouped`; the MoE block's router weight is then fp32."""

    bias: torch.Tensor | None  # [E] fp32 e_score_correction_bias
    num_groups: int  # n_group
    topk_groups: int  # topk_group
    scaling: float  # routed_scaling_factor


@dataclass(frozen=True, eq=False)
class SharedExpert:
    """The expert every token of an MoE block also goes through: weighed by sigmoid(gate · x) (Qwen2-MoE),
    or as it is (GLM-4.5, DeepSeek: no gate).

    At TP > 1 its output is a partial sum like the routed experts'; the weight, one scalar per
    token from a replicated gate, is the same on every rank, so the all-reduce still adds up."""

    mlp: GatedMlp
    gate: Linear | None  # [1, hidden]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out if self.gate is None else out * torch.sigmoid(self.gate(x).float()).to(x.dtype)
