"""apply_rope: the Triton kernel (interpreted) against the torch reference, and the
reference against transformers' rotate-half formula; its KV store against KvCache.write."""
import pytest
import torch

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from kv_pools import LAYER, POOLS, kv_pool, scattered_slots, stored_bytes, write_as_model_did
from pdserve.engine.kernels.rope import apply_rope, apply_rope_reference, apply_rope_triton, build_cos_sin_cache
from pdserve.engine.kv_cache import FP8_KV_MAX, KvStore

MAX_POSITION = 4096


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """q [T, H, D] and k [T, KVH, D] as views into a fused qkv projection output [T, (H + 2·KVH)·D]."""
    q = qkv[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim))
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].unflatten(1, (num_kv_heads, head_dim))
    return q, k


def split_v(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """v [T, KVH, D], the view after q and k."""
    return qkv[:, (num_heads + num_kv_heads) * head_dim:].unflatten(1, (num_kv_heads, head_dim))


def make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = build_cos_sin_cache(inv_freq.to(device), MAX_POSITION, attention_scaling=1.1)
    return qkv.to(device), positions.to(device), cache


def hf_rope(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb in fp32: x·cos + rotate_half(x)·sin, cos = cat(c, c)."""
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((sin, sin), -1).unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens, num_heads, num_kv_heads, head_dim",
    [(1, 4, 4, 64), (5, 12, 4, 128), (3, 8, 2, 64)],  # GQA 1, 3 and 4
)
def test_matches_reference_in_place(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    qkv, positions, cache = make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    expected = qkv.clone()
    apply_rope_reference(*split_qkv(expected, num_heads, num_kv_heads, head_dim), positions, cache)
    apply_rope_triton(*split_qkv(qkv, num_heads, num_kv_heads, head_dim), positions, cache)
    assert relative_error(qkv, expected) < TOLERANCE[dtype]
    v_start = (num_heads + num_kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], expected[:, v_start:]), "V is not touched"


@requires_triton
def test_partial_rotary_turns_only_the_leading_dims():
    # Phi-4-mini: rope over 96 of 128 dims, the kernel given views of each head's first 96
    num_heads, num_kv_heads, head_dim, rotary = 4, 2, 128, 96
    qkv, positions, _ = make_inputs(3, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2).float() / rotary))
    cache = build_cos_sin_cache(inv_freq.to(DEVICE), MAX_POSITION)
    expected = qkv.clone()
    apply_rope_reference(*(x[..., :rotary] for x in split_qkv(expected, num_heads, num_kv_heads, head_dim)),
                         positions, cache)
    before = qkv.clone()
    apply_rope_triton(*(x[..., :rotary] for x in split_qkv(qkv, num_heads, num_kv_heads, head_dim)), positions, cache)
    assert relative_error(qkv, expected) < TOLERANCE[torch.bfloat16]
    q, _ = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    assert torch.equal(q[..., rotary:], split_qkv(before, num_heads, num_kv_heads, head_dim)[0][..., rotary:])
    assert not torch.equal(q[..., :rotary], split_qkv(before, num_heads, num_kv_heads, head_dim)[0][..., :rotary])


@requires_triton
@pytest.mark.parametrize("dtype, pool_dtype", POOLS)
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim",
                         [(7, 12, 4, 64), (5, 8, 1, 48), (3, 4, 4, 32)])  # GQA 3, 8, 1; 48: BLOCK_D masks
def test_kv_store_is_rope_then_kv_cache_write(num_tokens, num_heads, num_kv_heads, head_dim, dtype, pool_dtype):
    """One launch stores what the separate KvCache.write stored after the rope kernel, byte for byte,
    and leaves q, k and v in qkv as that rope kernel did."""
    qkv, positions, cache = make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    qkv = qkv * 2  # past K's FP8 bound more often
    slots = scattered_slots(num_tokens)
    expected_qkv, expected_pool = qkv.clone(), kv_pool(pool_dtype, num_kv_heads, head_dim)
    apply_rope_triton(*split_qkv(expected_qkv, num_heads, num_kv_heads, head_dim), positions, cache)
    write_as_model_did(expected_pool, slots, expected_qkv, num_heads, num_kv_heads, head_dim)
    pool = kv_pool(pool_dtype, num_kv_heads, head_dim)
    store = KvStore(pool, LAYER, slots, split_v(qkv, num_heads, num_kv_heads, head_dim))
    apply_rope_triton(*split_qkv(qkv, num_heads, num_kv_heads, head_dim), positions, cache, store)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(stored_bytes(pool), stored_bytes(expected_pool))
    if pool.spec.is_fp8:  # the clamp was met
        assert (expected_pool.layer(LAYER)[0].float().abs() == FP8_KV_MAX).any()


def test_reference_is_hf_rotate_half():
    qkv, positions, cache = make_inputs(6, 4, 2, 64, torch.float32)
    q, k = split_qkv(qkv, 4, 2, 64)
    expected_q, expected_k = hf_rope(q, positions, cache), hf_rope(k, positions, cache)
    apply_rope_reference(q, k, positions, cache)
    assert relative_error(q, expected_q) < 1e-6 and relative_error(k, expected_k) < 1e-6


def test_cos_sin_cache_matches_hf_rotary_embedding():
    """cos(p·inv_freq) then sin(p·inv_freq), each times the attention factor."""
    inv_freq = torch.tensor([1.0, 0.1, 0.01])
    cache = build_cos_sin_cache(inv_freq, 10, attention_scaling=2.0)
    angle = 7 * inv_freq
    assert cache.shape == (10, 6)
    assert torch.allclose(cache[7], 2.0 * torch.cat((angle.cos(), angle.sin())))


def test_dispatcher_uses_reference_on_cpu():
    qkv, positions, cache = make_inputs(3, 4, 2, 64, torch.float32, device="cpu")
    expected = qkv.clone()
    apply_rope_reference(*split_qkv(expected, 4, 2, 64), positions, cache)
    assert apply_rope(*split_qkv(qkv, 4, 2, 64), positions, cache) is None
    assert torch.equal(qkv, expected)


@pytest.mark.parametrize("dtype, pool_dtype", POOLS)
def test_dispatcher_on_cpu_stores_with_kv_cache_write(dtype, pool_dtype):
    qkv, positions, cache = make_inputs(5, 4, 2, 64, dtype, device="cpu")
    slots = scattered_slots(5, device="cpu")
    expected_qkv, expected_pool = qkv.clone(), kv_pool(pool_dtype, 2, 64, device="cpu")
    apply_rope_reference(*split_qkv(expected_qkv, 4, 2, 64), positions, cache)
    write_as_model_did(expected_pool, slots, expected_qkv, 4, 2, 64)
    pool = kv_pool(pool_dtype, 2, 64, device="cpu")
    apply_rope(*split_qkv(qkv, 4, 2, 64), positions, cache, KvStore(pool, LAYER, slots, split_v(qkv, 4, 2, 64)))
    assert torch.equal(qkv, expected_qkv) and torch.equal(stored_bytes(pool), stored_bytes(expected_pool))
