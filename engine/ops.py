"""The model's building blocks, one function each: Triton on CUDA, plain torch elsewhere.

Shapes: T tokens, H heads, KVH kv heads, D head_dim, B sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, scale in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rope on q [T, H, D] and k [T, KVH, D]; cos_sin [max_len, D] (cos | sin)."""
    half = cos_sin.shape[-1] // 2
    table = cos_sin.index_select(0, positions)
    cos = torch.cat([table[:, :half]] * 2, dim=-1).unsqueeze(1).to(q.dtype)  # [T, 1, D]
    sin = torch.cat([table[:, half:]] * 2, dim=-1).unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, D] are the last Q positions of k, v [K, KVH, D]; returns [Q, H, D]."""
    q_len, k_len = q.shape[0], k.shape[0]
    q_, k_, v_ = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, D]
    if q_len == k_len:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=True)
    else:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
        mask = torch.arange(k_len, device=q.device).unsqueeze(0) <= rows  # [Q, K]
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its blocks: q [B, H, D], caches [N, bs, KVH, D] -> [B, H, D]."""
    block_size = k_cache.shape[1]
    outputs = []
    for row in range(q.shape[0]):
        length = int(context_lens[row])
        ids = block_tables[row, : -(-length // block_size)].long()
        k = k_cache.index_select(0, ids).flatten(0, 1)[:length]
        v = v_cache.index_select(0, ids).flatten(0, 1)[:length]
        outputs.append(causal_attention(q[row:row + 1], k, v, scale))
    return torch.cat(outputs)
