"""prefill_attention_varlen: the Triton kernel (interpreted) against the per-sequence SDPA reference."""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.prefill_attention import (
    prefill_attention_varlen,
    prefill_attention_varlen_reference,
    prefill_attention_varlen_triton,
)


def cu_seqlens(lengths: list[int], device=DEVICE) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def make_inputs(q_lens, k_lens, num_heads, num_kv_heads, head_dim, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype)
    return q.to(device), k.to(device), v.to(device)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths, num_heads, num_kv_heads, head_dim",
    [
        ([1], 4, 4, 64),  # one token, MHA
        ([70, 1, 139], 6, 2, 128),  # group 3, lengths crossing both tile sizes
        ([33, 200], 8, 2, 64),  # group 4, several query blocks
    ],
)
def test_matches_reference(lengths, num_heads, num_kv_heads, head_dim, dtype):
    q, k, v = make_inputs(lengths, lengths, num_heads, num_kv_heads, head_dim, dtype)
    cu = cu_seqlens(lengths)
    out = prefill_attention_varlen_triton(q, k, v, cu, max(lengths), head_dim**-0.5)
    ref = prefill_attention_varlen_reference(q, k, v, cu, max(lengths), head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_queries_are_the_tail_of_the_keys(dtype):
    q_lens, k_lens = [20, 150, 7], [90, 150, 7]  # a tail chunk, a whole prompt, a short one
    q, k, v = make_inputs(q_lens, k_lens, 8, 2, 64, dtype)
    args = (q, k, v, cu_seqlens(q_lens), max(q_lens), 0.125)
    out = prefill_attention_varlen_triton(*args, cu_seqlens_k=cu_seqlens(k_lens))
    ref = prefill_attention_varlen_reference(*args, cu_seqlens_k=cu_seqlens(k_lens))
    assert relative_error(out, ref) < TOLERANCE[dtype]


def test_reference_chunk_equals_the_tail_of_full_causal_attention():
    """Queries 70..89 of a 90-token prompt attend exactly as in the whole-prompt pass."""
    q, k, v = make_inputs([90], [90], 4, 2, 64, torch.float32)
    whole = prefill_attention_varlen_reference(q, k, v, cu_seqlens([90]), 90, 0.125)
    tail = prefill_attention_varlen_reference(
        q[70:], k, v, cu_seqlens([20]), 20, 0.125, cu_seqlens_k=cu_seqlens([90])
    )
    assert relative_error(tail, whole[70:]) < 1e-6


def test_reference_is_sdpa_is_causal_per_sequence():
    q, k, v = make_inputs([30, 12], [30, 12], 4, 4, 64, torch.float32)
    out = prefill_attention_varlen_reference(q, k, v, cu_seqlens([30, 12]), 30, 0.125)
    second = F.scaled_dot_product_attention(
        q[30:].transpose(0, 1), k[30:].transpose(0, 1), v[30:].transpose(0, 1), is_causal=True, scale=0.125
    ).transpose(0, 1)
    assert relative_error(out[30:], second) < 1e-6


def test_dispatcher_uses_reference_on_cpu():
    q, k, v = make_inputs([9, 4], [9, 4], 4, 2, 64, torch.bfloat16, device="cpu")
    args = (q, k, v, cu_seqlens([9, 4], device="cpu"), 9, 0.125)
    assert torch.equal(prefill_attention_varlen(*args), prefill_attention_varlen_reference(*args))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 40, 100])
def test_sliding_window_matches_reference(window, dtype):
    """Whole prompts and tail chunks over a cached prefix, windows shorter than some of them;
    query blocks of 128 rows start tiles before some rows' windows (rows with no key in a tile)."""
    q_lens, k_lens = [150, 20, 7, 300], [150, 90, 7, 300]
    q, k, v = make_inputs(q_lens, k_lens, 8, 2, 64, dtype)
    args = (q, k, v, cu_seqlens(q_lens), max(q_lens), 0.125, cu_seqlens(k_lens))
    out = prefill_attention_varlen_triton(*args, window=window)
    ref = prefill_attention_varlen_reference(*args, window=window)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert relative_error(out, prefill_attention_varlen_reference(*args)) > 0.05  # the window matters


def test_reference_window_is_transformers_sliding_window_overlay():
    """Query i sees keys i - window < j <= i (transformers' sliding_window_overlay on the causal mask)."""
    q, k, v = make_inputs([30], [30], 2, 2, 16, torch.float32)
    window = 5
    out = prefill_attention_varlen_reference(q, k, v, cu_seqlens([30]), 30, 0.25, window=window)
    i, j = torch.arange(30, device=q.device)[:, None], torch.arange(30, device=q.device)[None, :]
    mask = (j <= i) & (j > i - window)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25).transpose(0, 1)
    assert relative_error(out, expected) < 1e-6


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_capped_scores_match_reference(dtype):
    """Gemma 2's cap on the scores (scale 1: random scores pass the cap of 2), whole prompts, a chunk, a window."""
    q_lens, k_lens = [150, 20, 7], [150, 90, 7]
    q, k, v = make_inputs(q_lens, k_lens, 8, 2, 64, dtype)
    args = (q, k, v, cu_seqlens(q_lens), max(q_lens), 1.0, cu_seqlens(k_lens))
    for window in (None, 40):
        out = prefill_attention_varlen_triton(*args, window=window, softcap=2.0)
        ref = prefill_attention_varlen_reference(*args, window=window, softcap=2.0)
        assert relative_error(out, ref) < TOLERANCE[dtype]
        assert relative_error(out, prefill_attention_varlen_reference(*args, window=window)) > 0.05  # it matters


def test_reference_soft_cap_is_transformers_formula():
    """softmax(cap · tanh(q·kᵀ·scale / cap) + causal mask) · v, as transformers' Gemma 2 eager attention."""
    q, k, v = make_inputs([12], [12], 2, 1, 16, torch.float32)
    out = prefill_attention_varlen_reference(q, k, v, cu_seqlens([12]), 12, 0.5, softcap=1.5)
    scores = torch.tanh(q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2).repeat(2, 1, 1) * 0.5 / 1.5) * 1.5
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    expected = (scores.softmax(-1) @ v.transpose(0, 1).repeat(2, 1, 1)).transpose(0, 1)
    assert relative_error(out, expected) < 1e-6
