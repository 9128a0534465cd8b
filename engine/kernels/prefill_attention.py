"""Causal attention over packed variable-length sequences (prefill), flash-attention style.

Shapes (sequences packed back to back, no padding):

    q             [Tq, num_heads, head_dim]     bf16/fp16/fp32, head_dim contiguous
    k, v          [Tk, num_kv_heads, head_dim]
    cu_seqlens_q  [B + 1] int32   sequence s's queries are rows cu_seqlens_q[s] : cu_seqlens_q[s + 1]
    cu_seqlens_k  [B + 1] int32   its keys likewise; None means the same as cu_seqlens_q
    out           [Tq, num_heads, head_dim] in q's dtype

Chunked prefill: a sequence may have fewer queries than keys (q_len <= k_len);
its queries are then the LAST q_len positions, so query i sees keys
j <= i + (k_len - q_len) (bottom-right aligned causal mask). With a sliding
`window`, also only j > i + (k_len - q_len) - window: the last `window` keys,
itself included (transformers' sliding_window_overlay).
Query head h reads KV head h // (num_heads // num_kv_heads).

GPU path: grid (ceil(max_seqlen_q / BLOCK_M), B, num_heads); each program
streams K/V tiles up to its causal limit with an fp32 online softmax.
"""
import math

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.softcap import soft_cap, soft_cap_reference

# Tuning knobs for the GPU: 128 × 64 tiles with 8 warps is the usual H100 choice for head_dim 128;
# 3 pipeline stages measured faster than 2 on an H100 (benchmarks/ENGINE_NOTES.md).
_BLOCK_M = 128  # queries per program
_BLOCK_N = 64  # keys per tile
_NUM_WARPS = 8
_NUM_STAGES = 3


def prefill_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    cu_seqlens_k: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """(scores soft-capped at `softcap` before the softmax, where given: Gemma 2)"""
    args = (q, k, v, cu_seqlens_q, max_seqlen_q, scale, cu_seqlens_k, window, softcap)
    if use_triton(q, k, v, cu_seqlens_q):
        return prefill_attention_varlen_triton(*args)
    return prefill_attention_varlen_reference(*args)


def prefill_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    cu_seqlens_k: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One torch attention per sequence, in fp32 (max_seqlen_q is unused here)."""
    starts_q = cu_seqlens_q.tolist()
    starts_k = starts_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for seq in range(len(starts_q) - 1):
        q_rows = slice(starts_q[seq], starts_q[seq + 1])
        k_rows = slice(starts_k[seq], starts_k[seq + 1])
        q_len, k_len = q_rows.stop - q_rows.start, k_rows.stop - k_rows.start
        # bottom-right causal: equals is_causal when q_len == k_len
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        if window:
            mask = mask.triu(k_len - q_len - window + 1)
        out[q_rows] = _attend(q[q_rows], k[k_rows], v[k_rows], mask, scale, softcap).to(q.dtype)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            softcap: float | None) -> torch.Tensor:
    """One sequence's attention in fp32: q [q_len, H, D], k and v [k_len, KVH, D] -> [q_len, H, D]."""
    q, k, v = (x.transpose(0, 1).float() for x in (q, k, v))  # [heads, len, D]
    if not softcap:  # torch's fused kernel
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = soft_cap_reference(q @ k.transpose(1, 2) * scale, softcap).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def prefill_attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    cu_seqlens_k: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert k.stride() == v.stride(), "K and V must share one layout"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "head_dim must be contiguous"
    assert cu_seqlens_q.dtype == torch.int32
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    num_seqs = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_seqlen_q, _BLOCK_M), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        scale * math.log2(math.e), (softcap or 1.0) * math.log2(math.e), window or 0,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        out.stride(0), out.stride(1),
        GROUP_SIZE=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 only matters for fp32
        SOFTCAP=bool(softcap),
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,  # [Tq, H, D]
    k_ptr,  # [Tk, KVH, D]
    v_ptr,  # [Tk, KVH, D]
    out_ptr,  # [Tq, H, D]
    cu_seqlens_q_ptr,  # [B + 1] int32
    cu_seqlens_k_ptr,  # [B + 1] int32
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    softcap,  # cap * log2(e): the scores' soft cap in those units (read only with SOFTCAP)
    window,  # a sliding window's keys (0: every earlier key)
    stride_qt, stride_qh,
    stride_kvt, stride_kvh,
    stride_ot, stride_oh,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid covers the longest sequence
        return
    k_start = tl.load(cu_seqlens_k_ptr + seq)
    k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start
    causal_offset = k_len - q_len  # query i is key position i + causal_offset

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    kv_base = k_start.to(tl.int64) * stride_kvt + (head // GROUP_SIZE) * stride_kvh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys past the last query's causal limit are never needed, nor (with a window) keys
    # before the first query's window: start at the tile holding its first key
    n_end = tl.minimum(k_len, (m_block + 1) * BLOCK_M + causal_offset)
    n_first = 0
    if window > 0:
        n_first = tl.maximum(m_block * BLOCK_M + causal_offset - window + 1, 0) // BLOCK_N * BLOCK_N
    for n_start in range(n_first, n_end, BLOCK_N):
        keys = n_start + offs_n
        kv_mask = (keys < k_len)[:, None] & d_mask[None, :]
        kv_offs = kv_base + keys.to(tl.int64)[:, None] * stride_kvt + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            scores = soft_cap(scores, softcap)
        visible = (keys[None, :] <= offs_m[:, None] + causal_offset) & (keys[None, :] < k_len)
        if window > 0:
            visible = visible & (keys[None, :] > offs_m[:, None] + causal_offset - window)
        scores = tl.where(visible, scores, float("-inf"))
        # A row may see no key of a tile (before its window, or past its causal limit while
        # another row needs the tile): m_new is then -inf, and subtracting 0 instead keeps
        # exp2 at 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out_rows = (q_start + offs_m).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + out_rows[:, None] + offs_d[None, :],
        acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
        mask=m_mask[:, None] & d_mask[None, :],
    )
