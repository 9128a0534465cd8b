"""Per-head q/k RMSNorm, then rotary embedding, in place, in one launch (Qwen3, Gemma 3).

Shapes (as rope.py and rms_norm.py's `rms_norm_heads_`):

    q              [T, H, D]     bf16/fp16/fp32, D contiguous (views into the fused qkv are fine)
    k              [T, KVH, D]
    q_weight       [D], k_weight [D]   the norms' weights; the multiplier is (offset + weight)
    positions      [T] int64
    cos_sin_cache  [max_pos, D]  fp32

    q ← rope(rms_norm(q) per head);  k ← rope(rms_norm(k) per head)

Numerics are the two unfused kernels' exactly: the normalised head rounded to the
dtype as rms_norm.py rounds it (Llama-style or Gemma-style by `offset`), then rotated
in fp32 and rounded once, as rope.py does. What it saves is launches: at a decode
step of few tokens each of the three (q norm, k norm, rope) is a microsecond or two
of a kernel that moves a few kilobytes, once per layer. Given a `KvStore`, the launch
also writes each token's K (as rounded into k) and V into the paged KV cache, as
rope.py's kernel does and with its numerics (FP8 caches quantized as `KvCache.write`).
GPU path: one program per token, all of its q heads then all of its k heads, each
head's two halves in registers, then its K and V heads to their cache slot.
"""
from __future__ import annotations

import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.rms_norm import rms_norm_heads_
from pdserve.engine.kernels.rope import apply_rope, kv_store_arguments, store_kv
from pdserve.engine.kv_cache import KvStore


def qk_norm_rope_(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, offset: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, store: KvStore | None = None,
) -> None:
    """Normalises and rotates q and k in place; with `store`, writes the final k and store.v to the KV cache too."""
    if use_triton(q, k, q_weight, k_weight, positions, cos_sin_cache):
        qk_norm_rope_triton_(q, k, q_weight, k_weight, eps, offset, positions, cos_sin_cache, store)
    else:  # the unfused kernels' references
        rms_norm_heads_(q, q_weight, eps, offset)
        rms_norm_heads_(k, k_weight, eps, offset)
        apply_rope(q, k, positions, cos_sin_cache, store)


def qk_norm_rope_triton_(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, offset: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, store: KvStore | None = None,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape[2] == head_dim and q_weight.shape == k_weight.shape == (head_dim,)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous()
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(max(num_heads, num_kv_heads))
    block_d = triton.next_power_of_2(head_dim // 2)
    _qk_norm_rope_kernel[(num_tokens,)](
        q, k, q_weight, k_weight, positions, cos_sin_cache, eps, offset,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        **kv_store_arguments(k, store),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF_DIM=head_dim // 2,
        GEMMA_ROUNDING=offset != 0.0, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d <= 4096 else 8,
    )


@triton.jit
def _norm_rotate_heads(x_ptr, stride_h, num_heads, weight_ptr, cos, sin, eps, offset,
                       HALF_DIM: tl.constexpr, GEMMA_ROUNDING: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm of each of the num_heads heads at x_ptr ([num_heads, 2 * HALF_DIM]), then rope, in place;
    returns the two halves as stored."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HALF_DIM
    mask = (heads[:, None] < num_heads) & dim_mask[None, :]
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF_DIM, mask=mask, other=0.0)
    dtype = x1.dtype
    h1, h2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(h1 * h1, 1) + tl.sum(h2 * h2, 1)) / (2 * HALF_DIM) + eps)[:, None]
    w1 = tl.load(weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF_DIM + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    if GEMMA_ROUNDING:  # (h * (offset + w)) rounded once
        n1 = (h1 * rstd * (offset + w1)).to(dtype).to(tl.float32)
        n2 = (h2 * rstd * (offset + w2)).to(dtype).to(tl.float32)
    else:  # the normalised head rounded before the weight multiply, the product rounded
        n1 = ((h1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        n2 = ((h2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    y1 = (n1 * cos - n2 * sin).to(dtype)
    y2 = (n2 * cos + n1 * sin).to(dtype)
    tl.store(first, y1, mask=mask)
    tl.store(first + HALF_DIM, y2, mask=mask)
    return y1, y2


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, KVH, D]
    q_weight_ptr,  # [D]
    k_weight_ptr,  # [D]
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [max_pos, D] fp32
    eps,
    offset,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    # the KV store (kv_store_arguments), read only with STORE_KV
    v_ptr,  # [T, KVH, D]
    slots_ptr,  # [T] int64
    cache_ptr,  # [2, num_slots, KVH, D]  the layer's K and V: the model's dtype or float8e4nv
    inverse_scales_ptr,  # [2] fp32, K's and V's, read only if IS_FP8
    stride_vt, stride_vh,
    stride_ckv, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF_DIM: tl.constexpr,
    GEMMA_ROUNDING: tl.constexpr,
    STORE_KV: tl.constexpr,
    IS_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,  # kv_cache's (a kernel reads no globals)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    cache_row = cos_sin_ptr + tl.load(positions_ptr + token) * (2 * HALF_DIM)
    cos = tl.load(cache_row + dims, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF_DIM + dims, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    _norm_rotate_heads(q_ptr + token * stride_qt, stride_qh, NUM_HEADS, q_weight_ptr, cos, sin, eps, offset,
                       HALF_DIM, GEMMA_ROUNDING, BLOCK_H, BLOCK_D)
    k1, k2 = _norm_rotate_heads(k_ptr + token * stride_kt, stride_kh, NUM_KV_HEADS, k_weight_ptr, cos, sin, eps,
                                offset, HALF_DIM, GEMMA_ROUNDING, BLOCK_H, BLOCK_D)
    if STORE_KV:
        store_kv(k1, k2, token, v_ptr, slots_ptr, cache_ptr, inverse_scales_ptr, stride_vt, stride_vh,
                 stride_ckv, stride_cs, stride_ch, NUM_KV_HEADS, IS_FP8, FP8_MAX, HALF_DIM, BLOCK_H, BLOCK_D)
