"""paged_decode_attention: the Triton kernels (interpreted) against the torch reference."""
import pytest
import torch

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)

NUM_BLOCKS = 96


def make_inputs(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, device=DEVICE):
    """A shuffled block pool; padded block-table entries point far outside it (-1 and 10**9),
    so a kernel that reads one crashes or turns the output to garbage."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(context_lens)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1  # always one padded entry
    kv = torch.randn(2, NUM_BLOCKS, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    block_tables = torch.tensor([[-1, 10**9] * max_blocks] * num_seqs, dtype=torch.int32)[:, :max_blocks]
    pool = torch.randperm(NUM_BLOCKS, generator=gen).int()
    used = 0
    for seq, n in enumerate(context_lens):
        num_blocks = -(-n // block_size)
        block_tables[seq, :num_blocks] = pool[used : used + num_blocks]
        used += num_blocks
    assert used <= NUM_BLOCKS
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, kv[0], kv[1], block_tables.contiguous(), lens))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "context_lens, num_heads, num_kv_heads, head_dim, block_size",
    [
        ([37], 4, 4, 64, 16),  # batch 1, one slice, MHA (group 1)
        ([1, 17, 130], 12, 4, 128, 16),  # group 3, lengths crossing block boundaries
        ([300, 5], 8, 2, 64, 8),  # group 4, block size 8, several slices
        ([513], 4, 1, 128, 32),  # group 4, odd length, many slices reduced
    ],
)
def test_matches_reference(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    q, k_cache, v_cache, block_tables, lens = make_inputs(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, scale)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("max_context_len", [None, 200])
def test_padding_row_gives_zeros(max_context_len):
    """A row with context_lens 0 is padding: zeros, whether or not slices are reduced."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([200, 1], 8, 4, 64, 16, torch.float32)
    lens[1] = 0
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.125, max_context_len)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


@requires_triton
def test_max_context_len_only_changes_the_split():
    """A tight max_context_len (more, shorter slices) gives the same answer as the default bound."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([250, 90], 4, 2, 64, 16, torch.float32)
    default = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.125)
    tight = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.125, max_context_len=250)
    assert relative_error(tight, default) < 1e-6


def test_dispatcher_uses_reference_on_cpu():
    q, k_cache, v_cache, block_tables, lens = make_inputs([20, 3], 6, 2, 64, 16, torch.bfloat16, device="cpu")
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.125)
    assert torch.equal(out, paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 0.125))


def test_reference_is_attention_over_the_gathered_context():
    """The oracle itself, against SDPA over contiguous K/V (GQA by repeating KV heads)."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([45], 6, 2, 64, 16, torch.float32)
    blocks = block_tables[0, :3].long()
    k = k_cache[blocks].flatten(0, 1)[:45].repeat_interleave(3, dim=1).transpose(0, 1)  # [H, n, D]
    v = v_cache[blocks].flatten(0, 1)[:45].repeat_interleave(3, dim=1).transpose(0, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q[0].unsqueeze(1), k, v, scale=0.125).squeeze(1)
    out = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 0.125)
    assert relative_error(out[0], expected) < 1e-5


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, max_context_len", [(1, None), (50, None), (50, 513), (4096, None)])
def test_sliding_window_matches_reference(window, max_context_len, dtype):
    """Contexts shorter and longer than the window; several slices over the window, or one."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([513, 37, 130, 0], 8, 2, 64, 16, dtype)
    args = (q, k_cache, v_cache, block_tables, lens, 0.125)
    out = paged_decode_attention_triton(*args, max_context_len, window)
    ref = paged_decode_attention_reference(*args, window)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # padding row


def test_reference_window_reads_the_last_tokens_only():
    """A window of w over a context of n: the same as attending to a context holding only its last w tokens."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([45], 6, 2, 64, 16, torch.float32)
    windowed = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 0.125, window=10)
    blocks = block_tables[0, :3].long()
    k = k_cache[blocks].flatten(0, 1)[35:45].repeat_interleave(3, dim=1).transpose(0, 1)
    v = v_cache[blocks].flatten(0, 1)[35:45].repeat_interleave(3, dim=1).transpose(0, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q[0].unsqueeze(1), k, v, scale=0.125).squeeze(1)
    assert relative_error(windowed[0], expected) < 1e-5


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_capped_scores_match_reference(dtype):
    """Gemma 2's cap (scale 1: random scores pass the cap of 2), over several slices and with a window."""
    q, k_cache, v_cache, block_tables, lens = make_inputs([300, 5, 77], 8, 2, 64, 16, dtype)
    for window in (None, 40):
        out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 1.0, window=window, softcap=2.0)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 1.0, window, softcap=2.0)
        assert relative_error(out, ref) < TOLERANCE[dtype]
        uncapped = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lens, 1.0, window)
        assert relative_error(out, uncapped) > 0.05  # the cap matters
