"""KV pools for the rope kernels' fused store tests, and the store they replace: `KvCache.write`
of qkv's K and V as Model._attention called it."""
import pytest
import torch

from kernel_target import DEVICE
from pdserve.engine.kv_cache import KvCache, KvCacheSpec

NUM_LAYERS, LAYER, NUM_BLOCKS, BLOCK_SIZE = 2, 1, 6, 4
# layer 1's (K, V) scales: K's clamps some of its values to ±448, 1 / 0.3 is inexact in fp32 and V's small
# values land on e4m3 subnormals; layer 0's are there to be ignored
FP8_SCALES = ((1.0, 1.0), (0.004, 0.3))

# (model dtype, pool dtype)
POOLS = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-pool"),
    pytest.param(torch.float32, torch.float32, id="fp32-pool"),
    pytest.param(torch.bfloat16, torch.float8_e4m3fn, id="fp8-pool-bf16-model"),
    pytest.param(torch.float32, torch.float8_e4m3fn, id="fp8-pool-fp32-model"),
]


def kv_pool(dtype: torch.dtype, num_kv_heads: int, head_dim: int, device=DEVICE) -> KvCache:
    """An empty pool of NUM_BLOCKS blocks; FP8 pools get FP8_SCALES."""
    spec = KvCacheSpec(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, dtype, torch.device(device))
    return KvCache(spec, scales=FP8_SCALES if spec.is_fp8 else None)


def scattered_slots(num_tokens: int, seed: int = 0, device=DEVICE) -> torch.Tensor:
    """[T] int64 distinct slots in no order, across the pool's blocks."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_tokens].to(device)


def write_as_model_did(cache: KvCache, slots: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> None:
    """The unfused store: K (rotated in place in qkv) and V, [2, T, kv_heads, head_dim] views of qkv."""
    kv = qkv[:, num_heads * head_dim:].view(-1, 2, num_kv_heads, head_dim).transpose(0, 1)
    cache.write(LAYER, slots, kv)


def stored_bytes(cache: KvCache) -> torch.Tensor:
    """The whole pool's bytes: equal bytes are equal values, FP8 and NaN included."""
    return cache.tensor.view(torch.uint8)
