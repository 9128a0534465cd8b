"""The paged KV cache: one device tensor holding every layer's key and value blocks.

Layout, shared by the model, the kernels and the transfer backends:

    tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
            (index 0 of the second axis is K, 1 is V)

One allocation, so a peer on the same GPU maps the whole pool once (CUDA IPC),
and a layer's blocks for a sequence are `tensor[layer][:, block_ids]`. Scratch
blocks (CUDA graphs' padding rows write there) sit past `spec.num_blocks`, the
pool that block pools and transfers see.

The KV dtype may differ from the model's (`kv_cache.dtype: fp8_e4m3`): the tensor then
holds float8_e4m3fn, K and V are quantized when written (`write`: x / scale, clamped to
e4m3's range) and dequantized where read (the attention kernels take the scales;
`dequantize` for gathered prefixes). Scales are per tensor: one for K and one for V of
each layer (1.0 by default; `KvCache(scales=...)` takes calibrated ones). A prefill with
no cached prefix attends over its fresh K/V before they are stored; decode and chunks
after a cached prefix read the stored FP8. Transfers move the stored bytes as they are:
an FP8 pool hands off half the bytes of a bf16 one.

At a forward step the rope kernels store each layer's new K and V themselves, as they
rotate K (a `KvStore` says where): one launch where rope and `write` were two. They
round and quantize as `write` does, which stays the reference and the CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # largest finite float8_e4m3fn: what an FP8 pool clamps to
KV_DTYPES = ("auto", "fp8_e4m3")  # auto: the model's dtype


def kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for a `kv_cache.dtype` setting."""
    if name == "auto":
        return model_dtype
    if name == "fp8_e4m3":
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache.dtype {name!r} is not one of {list(KV_DTYPES)}")


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor viewed as uint8 (same bytes): index_copy_ and the collectives have no FP8 kernels."""
    return t.view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t


@dataclass(frozen=True)
class KvCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # what the pool stores: the model's dtype, or float8_e4m3fn
    device: torch.device

    @property
    def is_fp8(self) -> bool:
        return self.dtype == FP8_KV_DTYPE

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


class KvCache:
    """The KV tensor of one replica, with block-wise export and import."""

    def __init__(self, spec: KvCacheSpec, num_scratch_blocks: int = 0,
                 scales: tuple[tuple[float, float], ...] | None = None):
        """`num_scratch_blocks`: extra blocks after the pool's, ids num_blocks.. (outside every block pool);
        `scales`: (K, V) scale per layer of an FP8 pool (default 1.0)."""
        self.spec = spec
        num_blocks = spec.num_blocks + num_scratch_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.tensor = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.scales = scales if scales is not None else ((1.0, 1.0),) * spec.num_layers
        if len(self.scales) != spec.num_layers:
            raise ValueError(f"{len(self.scales)} KV scale pairs for {spec.num_layers} layers")
        # [num_layers, 2, 1, 1, 1]: divides a layer's [2, T, kv_heads, head_dim] K and V at once
        self._inverse_scales = torch.tensor([[1 / k, 1 / v] for k, v in self.scales],
                                            device=spec.device).view(-1, 2, 1, 1, 1)

    def layer(self, layer: int) -> torch.Tensor:
        """[2, num_blocks, block_size, num_kv_heads, head_dim], a view."""
        return self.tensor[layer]

    def flat_layer(self, layer: int) -> torch.Tensor:
        """[2, num_slots, num_kv_heads, head_dim], a view: slot s is block s // block_size, offset s % block_size."""
        return self.tensor[layer].view(2, -1, self.spec.num_kv_heads, self.spec.head_dim)

    def inverse_scales(self, layer: int) -> torch.Tensor:
        """[2] fp32: what `write` multiplies K and V of `layer` by before rounding them to FP8."""
        return self._inverse_scales[layer].view(2)

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store new tokens' K and V, kv [2, T, kv_heads, head_dim] in the model's dtype, at flat `slots` [T]."""
        flat = self.flat_layer(layer)
        if self.spec.is_fp8:
            quantized = (kv.float() * self._inverse_scales[layer]).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)
            raw_bytes(flat).index_copy_(1, slots, raw_bytes(quantized))
        else:
            flat.index_copy_(1, slots, kv)

    def dequantize(self, layer: int, kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored K and V of `layer` ([2, ...], K first) in `dtype`; a no-op unless the pool is FP8."""
        if not self.spec.is_fp8:
            return kv
        k_scale, v_scale = self.scales[layer]
        return torch.stack([kv[0].to(dtype) * k_scale, kv[1].to(dtype) * v_scale])

    def export_blocks(self, layer: int, block_ids: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """A contiguous copy [2, n, block_size, kv heads, head_dim] of one layer's blocks (of some heads only)."""
        blocks = raw_bytes(self.tensor[layer]).index_select(1, block_ids.to(self.tensor.device))
        if heads != slice(None):
            blocks = blocks[:, :, :, heads].contiguous()
        return blocks.view(self.spec.dtype)

    def import_blocks(self, layer: int, block_ids: torch.Tensor, data: torch.Tensor,
                      heads: slice = slice(None)) -> None:
        """Write `data` ([2, n, ...], as `export_blocks` gives) into this pool's `block_ids` (and `heads`)."""
        raw_bytes(self.tensor[layer])[:, :, :, heads].index_copy_(1, block_ids.to(self.tensor.device),
                                                                  raw_bytes(data.to(self.tensor.device)))


@dataclass(frozen=True)
class KvStore:
    """New tokens' K and V for one layer, for a kernel that makes K to store it as it goes (the rope kernels:
    engine/kernels/rope.py). The kernel writes the K it rounded and `v` at each token's slot of
    `cache.flat_layer(layer)`, quantized as `KvCache.write` does; `write` is that reference."""

    cache: KvCache
    layer: int
    slots: torch.Tensor  # [T] int64, flat (block * block_size + offset)
    v: torch.Tensor  # [T, kv_heads, head_dim] in the model's dtype

    def write(self, k: torch.Tensor) -> None:
        """Store k [T, kv_heads, head_dim] and v where no kernel does (CPU tensors)."""
        self.cache.write(self.layer, self.slots, torch.stack((k, self.v)))


def num_blocks_that_fit(bytes_per_block: int, device: torch.device, memory_fraction: float, cpu_num_blocks: int) -> int:
    """How many blocks a replica's KV pool gets: a share of free CUDA memory, a fixed count on the CPU."""
    if device.type != "cuda":
        return cpu_num_blocks
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * memory_fraction) // bytes_per_block)
