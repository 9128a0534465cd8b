"""The paged KV cache: one device tensor holding every layer's key and value blocks.

Layout, shared by the model, the kernels and the transfer backends:

    tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
            (index 0 of the second axis is K, 1 is V)

One allocation, so a peer on the same GPU maps the whole pool once (CUDA IPC),
and a layer's blocks for a sequence are `tensor[layer][:, block_ids]`. Scratch
blocks (CUDA graphs' padding rows write there) sit past `spec.num_blocks`, the
pool that block pools and transfers see.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KvCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

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

    def __init__(self, spec: KvCacheSpec, num_scratch_blocks: int = 0):
        """`num_scratch_blocks`: extra blocks after the pool's, ids num_blocks.. (outside every block pool)."""
        self.spec = spec
        num_blocks = spec.num_blocks + num_scratch_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.tensor = torch.zeros(shape, dtype=spec.dtype, device=spec.device)

    def layer(self, layer: int) -> torch.Tensor:
        """[2, num_blocks, block_size, num_kv_heads, head_dim], a view."""
        return self.tensor[layer]

    def export_blocks(self, layer: int, block_ids: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """A contiguous copy [2, n, block_size, kv heads, head_dim] of one layer's blocks (of some heads only)."""
        blocks = self.tensor[layer].index_select(1, block_ids.to(self.tensor.device))
        return blocks if heads == slice(None) else blocks[:, :, :, heads].contiguous()

    def import_blocks(self, layer: int, block_ids: torch.Tensor, data: torch.Tensor,
                      heads: slice = slice(None)) -> None:
        """Write `data` ([2, n, ...], as `export_blocks` gives) into this pool's `block_ids` (and `heads`)."""
        self.tensor[layer][:, :, :, heads].index_copy_(1, block_ids.to(self.tensor.device),
                                                       data.to(self.tensor.device))


def num_blocks_that_fit(bytes_per_block: int, device: torch.device, memory_fraction: float, cpu_num_blocks: int) -> int:
    """How many blocks a replica's KV pool gets: a share of free CUDA memory, a fixed count on the CPU."""
    if device.type != "cuda":
        return cpu_num_blocks
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * memory_fraction) // bytes_per_block)
