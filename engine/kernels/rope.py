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
GPU path: one program per token, all of its q and k heads.
"""
import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_position, D] fp32 from the model's inv_freq [D/2] (any rope_scaling already folded in)."""
    positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())  # [max_position, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if use_triton(q, k, positions, cos_sin_cache):
        apply_rope_triton(q, k, positions, cos_sin_cache)
    else:
        apply_rope_reference(q, k, positions, cos_sin_cache)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape[2] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous()
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF_DIM=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
        BLOCK_D=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, num_heads, HALF_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotates the num_heads heads at x_ptr ([num_heads, 2 * HALF_DIM]) in place."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF_DIM)
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF_DIM, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, KVH, D]
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [max_pos, D] fp32
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    cache_row = cos_sin_ptr + tl.load(positions_ptr + token) * (2 * HALF_DIM)
    cos = tl.load(cache_row + dims, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF_DIM + dims, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_HEADS, HALF_DIM, BLOCK_H, BLOCK_D)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF_DIM, BLOCK_H, BLOCK_D)
