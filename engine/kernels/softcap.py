"""Soft-capping of attention scores (Gemma 2): score ← cap · tanh(score / cap), before the softmax.

The attention kernels keep scores in base-2 units (score · log2 e, so the softmax is exp2);
capping commutes with that scaling when the cap is scaled too: they pass cap · log2 e.
"""
import torch

from pdserve.engine.kernels._triton import tl, triton


def soft_cap_reference(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if not cap else torch.tanh(scores / cap) * cap


@triton.jit
def soft_cap(x, cap):
    """cap · tanh(x / cap) in fp32, from exp (every Triton backend has it, the interpreter too)."""
    t = tl.exp(-2.0 * tl.abs(x / cap))
    y = cap * (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, y, -y)
