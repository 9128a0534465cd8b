"""Decode attention over an FP8 KV pool: the Triton kernels (interpreted) read float8_e4m3fn
K and V with their per-tensor scales, and match the reference on the same stored values."""
import pytest
import torch

from kernel_target import relative_error, requires_triton
from pdserve.engine.kernels.paged_attention import paged_decode_attention_reference, paged_decode_attention_triton
from test_paged_attention import make_inputs


@requires_triton
@pytest.mark.parametrize("context_lens, num_heads, num_kv_heads, head_dim, block_size",
                         [([37], 4, 4, 64, 16), ([300, 5], 8, 2, 64, 8)])
def test_fp8_cache_matches_reference(context_lens, num_heads, num_kv_heads, head_dim, block_size):
    q, k_cache, v_cache, tables, lens = make_inputs(context_lens, num_heads, num_kv_heads, head_dim, block_size,
                                                    torch.bfloat16)
    k_scale, v_scale = 0.5, 0.25  # stored = value / scale
    k8 = (k_cache.float() / k_scale).to(torch.float8_e4m3fn)
    v8 = (v_cache.float() / v_scale).to(torch.float8_e4m3fn)
    scale = head_dim ** -0.5
    out = paged_decode_attention_triton(q, k8, v8, tables, lens, scale, k_scale=k_scale, v_scale=v_scale)
    ref = paged_decode_attention_reference(q, k8, v8, tables, lens, scale, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2
    # ... and the reference reads the FP8 values as the dequantized bf16 cache it stands for
    dequantized = paged_decode_attention_reference(
        q, (k8.float() * k_scale).bfloat16(), (v8.float() * v_scale).bfloat16(), tables, lens, scale)
    assert relative_error(ref, dequantized) < 1e-2
    # and FP8 storage is within FP8's error of the unquantized cache
    assert relative_error(ref, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)) < 0.1
