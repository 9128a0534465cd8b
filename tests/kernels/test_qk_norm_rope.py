"""The fused q/k norm + rope (interpreted) against the unfused references, on views of a fused qkv."""
import pytest
import torch

from kernel_target import DEVICE, relative_error, requires_triton
from pdserve.engine.kernels.qk_norm_rope import qk_norm_rope_, qk_norm_rope_triton_
from pdserve.engine.kernels.rms_norm import rms_norm_reference
from pdserve.engine.kernels.rope import apply_rope_reference, build_cos_sin_cache


def inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(dtype) for _ in range(2)]
    positions = torch.randint(0, 64, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return qkv, q, k, weights, positions, build_cos_sin_cache(inv_freq, 64)


def unfused(q, k, weights, positions, cache, eps, offset):
    q, k = rms_norm_reference(q, weights[0], eps, offset), rms_norm_reference(k, weights[1], eps, offset)
    apply_rope_reference(q, k, positions, cache)
    return q, k


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama-norm", "gemma-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [(1, 4, 2, 32), (5, 6, 1, 24), (3, 2, 2, 16)])
def test_matches_unfused_norms_and_rope(num_tokens, num_heads, num_kv_heads, head_dim, dtype, offset):
    qkv, q, k, weights, positions, cache = inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    expected_q, expected_k = unfused(q.clone(), k.clone(), weights, positions, cache, 1e-6, offset)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    qkv = qkv.to(DEVICE)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    qk_norm_rope_triton_(q, k, *(w.to(DEVICE) for w in weights), 1e-6, offset, positions.to(DEVICE), cache.to(DEVICE))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert relative_error(q.cpu(), expected_q) < tolerance and relative_error(k.cpu(), expected_k) < tolerance
    if dtype == torch.bfloat16:  # the same roundings: all but a few elements bit-equal
        assert (q.cpu() != expected_q).float().mean() < 0.02
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:].cpu(), v_before), "v untouched"


def test_dispatcher_on_cpu_is_the_unfused_references():
    qkv, q, k, weights, positions, cache = inputs(3, 4, 2, 32, torch.float32)
    expected_q, expected_k = unfused(q.clone(), k.clone(), weights, positions, cache, 1e-6, 1.0)
    qk_norm_rope_(q, k, *weights, 1e-6, 1.0, positions, cache)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
