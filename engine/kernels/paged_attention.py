"""Decode attention over the paged KV cache: one query token per sequence.

Shapes (KV layout from engine/kv_cache.py, one layer's K or V):

    q             [B, num_heads, head_dim]                          bf16/fp16/fp32
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]  = kv[layer][0]
    v_cache       [num_blocks, block_size, num_kv_heads, head_dim]  = kv[layer][1]
    block_tables  [B, max_blocks] int32   (entries past a sequence's blocks: never read)
    context_lens  [B] int32               (tokens in the cache, the current one included)
    out           [B, num_heads, head_dim] in q's dtype

The cache may hold float8_e4m3fn (an FP8 KV pool): K and V are then widened to q's
dtype as they are loaded and scaled by their per-tensor `k_scale` / `v_scale`
(folded into the score scale and the output, so the inner loop only casts).

Query head h reads KV head h // (num_heads // num_kv_heads), as transformers'
`repeat_kv` does. A row with context_lens 0 is padding: its output is zeros.
With a sliding `window` the query (the last token) sees only the last `window`
tokens of its context (itself included), as transformers' sliding_window_overlay.

GPU path, flash-decoding style, two launches:
  1. `_decode_partition_kernel`, grid (B, num_kv_heads, num_partitions): each
     program takes all query heads of one KV group (so each K/V tile is read
     once per group) over one slice of the context, walks it in BLOCK_N-token
     tiles gathered through the block table in place, and keeps an fp32 online
     softmax. It writes the slice's normalised output and its log-sum-exp.
     Each sequence cuts ITS OWN context (or the window of it) into the grid's num_partitions slices
     (a multiple of BLOCK_N tokens each, read on the device from context_lens),
     so a launch sized without a host-side bound (a CUDA graph captured once for
     every context length) still spreads a short context over the slices.
  2. `_decode_reduce_kernel`, grid (B, num_heads): merges the slices by their
     log-sum-exp. Skipped when there is one slice: the first kernel then writes
     `out` directly.
The number of slices is chosen so that B × num_kv_heads × slices fills the SMs
about twice over (capped at one BLOCK_N tile per slice of the longest context):
B=1 at 1k tokens and 8 KV heads gives 16 slices of 64 tokens.
"""
import functools
import math

import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.softcap import soft_cap, soft_cap_reference

# Tuning knobs for the GPU (see the module docstring); BLOCK_N is also the
# smallest slice, so a slice never holds a tile of nothing but padding.
_BLOCK_N = 64  # context tokens per tile
_WAVES = 2  # aim for this many programs per SM in the partition kernel
_REDUCE_BLOCK_P = 16  # slices merged per step of the reduction
_NUM_WARPS = 4
_NUM_STAGES = 2  # software-pipelining depth of the partition kernel's tile loop


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V per sequence (the scores soft-capped at `softcap` first, where given);
    Triton on CUDA, the torch reference elsewhere.

    `max_context_len` (a host-side int the scheduler knows) caps the number of
    context slices; without it the bound is block_tables' width × block_size,
    which never syncs with the GPU (CUDA-graph safe). Either way each sequence's
    slices are sized from its own context length on the device.
    """
    if use_triton(q, k_cache, v_cache, block_tables, context_lens):
        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, window, k_scale, v_scale, softcap
        )
    return paged_decode_attention_reference(
        q, k_cache, v_cache, block_tables, context_lens, scale, window, k_scale, v_scale, softcap
    )


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Gathers each sequence's K/V and runs a plain fp32 softmax; one sequence at a time."""
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group_size = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for seq, context_len in enumerate(context_lens.tolist()):
        if context_len == 0:  # padding row
            continue
        blocks = block_tables[seq, : math.ceil(context_len / block_size)].long()
        # [context_len, num_heads, head_dim], each KV head repeated for its query heads
        first = max(0, context_len - window) if window else 0
        k = k_cache[blocks].flatten(0, 1)[first:context_len].float().repeat_interleave(group_size, dim=1) * k_scale
        v = v_cache[blocks].flatten(0, 1)[first:context_len].float().repeat_interleave(group_size, dim=1) * v_scale
        scores = soft_cap_reference(torch.einsum("hd,nhd->hn", q[seq].float(), k) * scale, softcap)  # [H, context]
        out[seq] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Launches the two kernels; works on any device Triton runs on (the interpreter included)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert k_cache.stride() == v_cache.stride(), "K and V must share one layout"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    group_size = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if window:
        max_context_len = min(max_context_len, window)
    window = window or 0  # 0: the whole context
    num_partitions = _num_partitions(num_seqs, num_kv_heads, max(max_context_len, 1), q.device)

    out = torch.empty_like(q)
    # One slice: the partition kernel's normalised output is final, so it writes `out`.
    if num_partitions == 1:
        partial = out.unsqueeze(2)  # [B, num_heads, 1, head_dim]
    else:
        partial = torch.empty(
            (num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32, device=q.device
        )
    lse = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse,
        scale * k_scale * math.log2(math.e), (softcap or 1.0) * math.log2(math.e), v_scale, num_partitions, window,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP_SIZE=group_size,
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=_BLOCK_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 only matters for fp32
        SOFTCAP=bool(softcap),
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    if num_partitions > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial, lse, context_lens, out, num_partitions, window,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_P=_REDUCE_BLOCK_P,
            BLOCK_N=_BLOCK_N,
        )
    return out


def _num_partitions(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Slices per sequence: enough programs to fill the GPU, no more slices than BLOCK_N tiles."""
    target_partitions = max(1, _WAVES * _num_sms(device) // (num_seqs * num_kv_heads))
    return min(target_partitions, triton.cdiv(max_context_len, _BLOCK_N))


@triton.jit
def _slice_tokens(span, num_partitions, BLOCK_N: tl.constexpr):
    """Tokens per slice of one sequence: its span over the slices, rounded up to BLOCK_N (>= BLOCK_N)."""
    per_slice = tl.cdiv(span, num_partitions)
    return tl.maximum(tl.cdiv(per_slice, BLOCK_N), 1) * BLOCK_N


@triton.jit
def _first_token(context_len, window):
    """The first context position the query sees: 0, or the window's start (window 0: none)."""
    return tl.where(window > 0, tl.maximum(context_len - window, 0), 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: pretend to be an H100
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _decode_partition_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, BLOCK_SIZE, KVH, D]
    v_ptr,  # [num_blocks, BLOCK_SIZE, KVH, D]
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, P, D]: fp32 slice outputs, or `out` itself when P == 1
    lse_ptr,  # [B, H, P] fp32, log2-sum-exp2 of each slice's scaled scores
    qk_scale,  # scale * k_scale * log2(e): the softmax runs in base 2 (exp2 is one instruction)
    softcap,  # cap * log2(e): the scores' soft cap in those units (read only with SOFTCAP)
    v_scale,  # an FP8 pool's V scale (1.0 otherwise): multiplies the slice's output once
    num_partitions,  # slices per sequence (the grid's third axis)
    window,  # a sliding window's keys (0: the whole context)
    stride_qb, stride_qh,
    stride_kvb, stride_kvt, stride_kvh,
    stride_btb,
    stride_ob, stride_oh, stride_op,
    stride_lb, stride_lh,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP_SIZE padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens)
    BLOCK_N: tl.constexpr,  # context tokens per tile
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first = _first_token(context_len, window)
    partition_size = _slice_tokens(context_len - first, num_partitions, BLOCK_N)
    start = first + part * partition_size
    end = tl.minimum(start + partition_size, context_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP_SIZE + offs_g
    g_mask = offs_g < GROUP_SIZE
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq * stride_btb
    for tile_start in range(start, end, BLOCK_N):
        toks = tile_start + offs_n
        n_mask = toks < end  # also keeps padded block-table entries unread
        blocks = tl.load(block_table + toks // BLOCK_SIZE, mask=n_mask, other=0)
        # int64: num_blocks × block stride can pass 2**31 elements on a large pool
        rows = blocks.to(tl.int64) * stride_kvb + (toks % BLOCK_SIZE) * stride_kvt + kv_head * stride_kvh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            scores = soft_cap(scores, softcap)
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # A slice past the context (or a padding row) has l_i == 0: it stores zeros
    # and lse = -inf, which the reduction weighs 0.
    has_tokens = l_i > 0
    l_safe = tl.where(has_tokens, l_i, 1.0)
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + part * stride_op + offs_d[None, :],
        acc * (v_scale / l_safe)[:, None],
        mask=g_mask[:, None] & d_mask[None, :],
    )
    lse = tl.where(has_tokens, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr,  # [B, H, P, D] fp32
    lse_ptr,  # [B, H, P] fp32, base 2
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D]
    num_partitions,  # slices per sequence in the partition kernel's grid
    window,  # as the partition kernel's
    stride_pb, stride_ph, stride_pp,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the partition kernel's tile, which sized the slices
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    span = context_len - _first_token(context_len, window)
    partition_size = _slice_tokens(span, num_partitions, BLOCK_N)
    num_used = tl.cdiv(span, partition_size)  # only slices that hold tokens

    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    partial = partial_ptr + seq * stride_pb + head * stride_ph
    lse_row = lse_ptr + seq * stride_lb + head * stride_lh
    m = float("-inf")  # running max of the slices' lse
    denom = 0.0  # running sum of exp2(lse - m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p_start in range(0, num_used, BLOCK_P):
        parts = p_start + offs_p
        p_mask = parts < num_used
        lse = tl.load(lse_row + parts, mask=p_mask, other=float("-inf"))  # [BLOCK_P]
        o = tl.load(
            partial + parts[:, None] * stride_pp + offs_d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_P, BLOCK_D]
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        weights = tl.exp2(lse - m_new)
        acc = acc * alpha + tl.sum(weights[:, None] * o, 0)
        denom = denom * alpha + tl.sum(weights, 0)
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)  # a padding row (no slices) gets zeros
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out, mask=d_mask)
