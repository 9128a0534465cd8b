"""Rotary position embedding, rotate-half convention (Llama / transformers, not interleaved).

Shapes:

    q              [T, H, D]     bf16/fp16/fp32, D contiguous (a view into a fused qkv is fine)
    k              [T, KVH, D]
    positions      [T] int64
    cos_sin_cache  [max_pos, D]  fp32: cos of the D/2 frequencies, then their sin,
                                 both times the rope attention factor

For x = [x1, x2] (halves of D) at position p, with c, s = cache[p] halves:

    x ← [x1·c − x2·s,  x2·c + x1·s]

in fp32, rounded once to x's dtype. q and k are rotated IN PLACE (nothing is
returned), so the attention kernels read them where the projection wrote them.

Given a `KvStore` (engine/kv_cache.py), the same launch also writes each token's K, as
rounded into k, and its V ([T, KVH, D]) at its slot of the layer's paged cache, so a
layer's KV write costs no launch of its own. An FP8 cache gets `KvCache.write`'s
quantization exactly: fp32 x · inverse scale (K's or V's, per tensor), clamped to ±448
(NaN kept), rounded to nearest-even e4m3. Where Triton does not run, the reference
rotates and then calls `KvStore.write` (that is, `KvCache.write`).
GPU path: one program per token, all of its q and k heads (and its V heads).
"""
from __future__ import annotations

import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kv_cache import FP8_KV_MAX, KvStore


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_position, D] fp32 from the model's inv_freq [D/2] (any rope_scaling already folded in)."""
    positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())  # [max_position, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    store: KvStore | None = None,
) -> None:
    """Rotates q and k in place; with `store`, writes the rotated k and store.v to the KV cache too."""
    if use_triton(q, k, positions, cos_sin_cache):
        apply_rope_triton(q, k, positions, cos_sin_cache, store)
    else:
        apply_rope_reference(q, k, positions, cos_sin_cache)
        if store is not None:
            store.write(k)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    store: KvStore | None = None,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape[2] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous()
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        **kv_store_arguments(k, store),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF_DIM=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
        BLOCK_D=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


def kv_store_arguments(k: torch.Tensor, store: KvStore | None) -> dict:
    """The rope kernels' store arguments, by name. With no store, STORE_KV is off and the pointers
    (k's, never written) only fill their places."""
    if store is None:
        return dict(v_ptr=k, slots_ptr=k, cache_ptr=k, inverse_scales_ptr=k,
                    stride_vt=0, stride_vh=0, stride_ckv=0, stride_cs=0, stride_ch=0,
                    STORE_KV=False, IS_FP8=False, FP8_MAX=FP8_KV_MAX)
    cache, v = store.cache.flat_layer(store.layer), store.v  # cache [2, num_slots, KVH, D]
    assert v.shape == k.shape and k.shape[1:] == cache.shape[2:] and store.slots.shape == (k.shape[0],)
    assert v.stride(-1) == 1 and cache.stride(-1) == 1 and v.dtype == k.dtype
    return dict(v_ptr=v, slots_ptr=store.slots, cache_ptr=cache,
                inverse_scales_ptr=store.cache.inverse_scales(store.layer),
                stride_vt=v.stride(0), stride_vh=v.stride(1),
                stride_ckv=cache.stride(0), stride_cs=cache.stride(1), stride_ch=cache.stride(2),
                STORE_KV=True, IS_FP8=store.cache.spec.is_fp8, FP8_MAX=FP8_KV_MAX)


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, num_heads, HALF_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotates the num_heads heads at x_ptr ([num_heads, 2 * HALF_DIM]) in place; returns the two halves as stored."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF_DIM)
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(first, y1, mask=mask)
    tl.store(first + HALF_DIM, y2, mask=mask)
    return y1, y2


@triton.jit
def store_kv(k1, k2, token, v_ptr, slots_ptr, cache_ptr, inverse_scales_ptr,
             stride_vt, stride_vh, stride_ckv, stride_cs, stride_ch, num_heads,
             IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
             HALF_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token's K (halves k1, k2 [BLOCK_H, BLOCK_D] in the model's dtype) and V (its num_heads heads in v)
    into the cache at the token's slot: K's heads there, V's stride_ckv further on."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF_DIM)
    v_first = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    v1 = tl.load(v_first, mask=mask, other=0.0)
    v2 = tl.load(v_first + HALF_DIM, mask=mask, other=0.0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    k_first = cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    _store_halves(k_first, k1, k2, inverse_scales_ptr, mask, IS_FP8, FP8_MAX, HALF_DIM)
    _store_halves(k_first + stride_ckv, v1, v2, inverse_scales_ptr + 1, mask, IS_FP8, FP8_MAX, HALF_DIM)


@triton.jit
def _store_halves(first, x1, x2, inverse_scale_ptr, mask, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                  HALF_DIM: tl.constexpr):
    """x1, x2 (halves of heads, the model's dtype) at first and first + HALF_DIM: as they are into a cache of
    the model's dtype, or quantized as KvCache.write does: clamp(fp32 x · inverse scale, ±FP8_MAX) rounded to
    e4m3 (one fp32 multiply, as torch's)."""
    if IS_FP8:
        inverse_scale = tl.load(inverse_scale_ptr)
        # NaN kept, as torch's clamp keeps it (and becomes e4m3's NaN), not clamped to a bound
        x1 = tl.clamp(x1.to(tl.float32) * inverse_scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        x2 = tl.clamp(x2.to(tl.float32) * inverse_scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(first, x1.to(first.dtype.element_ty), mask=mask)
    tl.store(first + HALF_DIM, x2.to(first.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, KVH, D]
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [max_pos, D] fp32
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
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_HEADS, HALF_DIM, BLOCK_H, BLOCK_D)
    k1, k2 = _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF_DIM, BLOCK_H, BLOCK_D)
    if STORE_KV:
        store_kv(k1, k2, token, v_ptr, slots_ptr, cache_ptr, inverse_scales_ptr, stride_vt, stride_vh,
                 stride_ckv, stride_cs, stride_ch, NUM_KV_HEADS, IS_FP8, FP8_MAX, HALF_DIM, BLOCK_H, BLOCK_D)
