"""The fused q/k norm + rope (interpreted) against the unfused references, on views of a fused qkv;
its KV store against KvCache.write."""
import pytest
import torch

from kernel_target import DEVICE, relative_error, requires_triton
from kv_pools import LAYER, POOLS, kv_pool, scattered_slots, stored_bytes, write_as_model_did
from pdserve.engine.kernels.qk_norm_rope import qk_norm_rope_, qk_norm_rope_triton_
from pdserve.engine.kernels.rms_norm import rms_norm_heads_, rms_norm_reference
from pdserve.engine.kernels.rope import apply_rope_reference, build_cos_sin_cache
from pdserve.engine.kv_cache import FP8_KV_MAX, KvStore


def inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(dtype) for _ in range(2)]
    positions = torch.randint(0, 64, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return qkv, q, k, weights, positions, build_cos_sin_cache(inv_freq, 64)


def split_qk(qkv, num_heads, num_kv_heads, head_dim):
    """q [T, H, D] and k [T, KVH, D], views of qkv."""
    q = qkv[:, :num_heads * head_dim].view(len(qkv), num_heads, head_dim)
    return q, qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(len(qkv), num_kv_heads, head_dim)


def split_v(qkv, num_heads, num_kv_heads, head_dim):
    """v [T, KVH, D], the view after q and k."""
    return qkv[:, (num_heads + num_kv_heads) * head_dim:].view(len(qkv), num_kv_heads, head_dim)


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


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama-norm", "gemma-norm"])
@pytest.mark.parametrize("dtype, pool_dtype", POOLS)
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [(7, 8, 2, 32), (5, 6, 1, 24), (3, 2, 2, 16)])
def test_kv_store_is_the_kernel_then_kv_cache_write(num_tokens, num_heads, num_kv_heads, head_dim, dtype, pool_dtype,
                                                    offset):
    """One launch stores what the separate KvCache.write stored after this kernel, byte for byte, and leaves
    q, k and v in qkv as the kernel alone did."""
    qkv, _, _, weights, positions, cache = inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    qkv, positions, cache = qkv.to(DEVICE), positions.to(DEVICE), cache.to(DEVICE)
    weights = [w.to(DEVICE) for w in weights]
    slots = scattered_slots(num_tokens)
    expected_qkv, expected_pool = qkv.clone(), kv_pool(pool_dtype, num_kv_heads, head_dim)
    qk_norm_rope_triton_(*split_qk(expected_qkv, num_heads, num_kv_heads, head_dim), *weights, 1e-6, offset,
                         positions, cache)
    write_as_model_did(expected_pool, slots, expected_qkv, num_heads, num_kv_heads, head_dim)
    pool = kv_pool(pool_dtype, num_kv_heads, head_dim)
    store = KvStore(pool, LAYER, slots, split_v(qkv, num_heads, num_kv_heads, head_dim))
    qk_norm_rope_triton_(*split_qk(qkv, num_heads, num_kv_heads, head_dim), *weights, 1e-6, offset, positions, cache,
                         store)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(stored_bytes(pool), stored_bytes(expected_pool))
    if pool.spec.is_fp8:  # the clamp was met
        assert (expected_pool.layer(LAYER)[0].float().abs() == FP8_KV_MAX).any()


@pytest.mark.parametrize("dtype, pool_dtype", POOLS)
def test_dispatcher_on_cpu_stores_with_kv_cache_write(dtype, pool_dtype):
    qkv, _, _, weights, positions, cache = inputs(5, 4, 2, 32, dtype)
    slots = scattered_slots(5, device="cpu")
    expected_qkv, expected_pool = qkv.clone(), kv_pool(pool_dtype, 2, 32, device="cpu")
    q, k = split_qk(expected_qkv, 4, 2, 32)
    rms_norm_heads_(q, weights[0], 1e-6, 0.0)
    rms_norm_heads_(k, weights[1], 1e-6, 0.0)
    apply_rope_reference(q, k, positions, cache)
    write_as_model_did(expected_pool, slots, expected_qkv, 4, 2, 32)
    pool = kv_pool(pool_dtype, 2, 32, device="cpu")
    qk_norm_rope_(*split_qk(qkv, 4, 2, 32), *weights, 1e-6, 0.0, positions, cache,
                  KvStore(pool, LAYER, slots, split_v(qkv, 4, 2, 32)))
    assert torch.equal(qkv, expected_qkv) and torch.equal(stored_bytes(pool), stored_bytes(expected_pool))
