"""The model runner: turns scheduled sequences into tensors and runs one step.

The schedulers (prefill and decode workers) see sequences and integer block ids;
only the runner builds tensors. It owns the model and the replica's KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KvCache, KvCacheSpec
from .loader import LoadedModel
from .model import DecodeAttention, LayerHook, LlamaModel, PrefillAttention


@dataclass(frozen=True)
class PrefillChunk:
    """New tokens of one sequence; `start_pos` tokens of it are already in the cache."""

    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]  # enough blocks for start_pos + len(token_ids) tokens


@dataclass(frozen=True)
class DecodeInput:
    token_id: int  # the last token, whose K and V this step writes
    position: int
    block_ids: tuple[int, ...]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        self.model = LlamaModel(loaded)
        self.spec = loaded.spec
        self.device = loaded.device
        self.kv_cache = KvCache(KvCacheSpec(
            num_layers=loaded.spec.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=loaded.spec.num_kv_heads,
            head_dim=loaded.spec.head_dim,
            dtype=loaded.dtype,
            device=loaded.device,
        ))
        self.block_size = block_size

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Logits [len(chunks), vocab] of each chunk's last token; KV written to the blocks."""
        tokens, positions, slots, starts, lens = [], [], [], [], []
        for chunk in chunks:
            span = range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids))
            starts.append(len(tokens))
            lens.append(len(chunk.token_ids))
            tokens.extend(chunk.token_ids)
            positions.extend(span)
            slots.extend(self._slot(chunk.block_ids, p) for p in span)
        attention = PrefillAttention(
            q_starts=tuple(starts),
            q_lens=tuple(lens),
            context_lens=tuple(c.start_pos + len(c.token_ids) for c in chunks),
            block_tables=tuple(c.block_ids for c in chunks),
        )
        last_rows = [s + n - 1 for s, n in zip(starts, lens)]
        return self.model.forward(
            self._tensor(tokens), self._tensor(positions), self._tensor(slots), attention,
            self._tensor(last_rows), self.kv_cache, on_layer_done,
        )

    @torch.inference_mode()
    def decode(self, inputs: list[DecodeInput]) -> torch.Tensor:
        """Logits [len(inputs), vocab] of one step for a batch of sequences."""
        width = max(len(i.block_ids) for i in inputs)
        tables = torch.tensor([list(i.block_ids) + [0] * (width - len(i.block_ids)) for i in inputs],
                              dtype=torch.int32, device=self.device)
        attention = DecodeAttention(
            block_tables=tables,
            context_lens=torch.tensor([i.position + 1 for i in inputs], dtype=torch.int32, device=self.device),
            max_context_len=max(i.position + 1 for i in inputs),
        )
        return self.model.forward(
            self._tensor([i.token_id for i in inputs]),
            self._tensor([i.position for i in inputs]),
            self._tensor([self._slot(i.block_ids, i.position) for i in inputs]),
            attention,
            self._tensor(list(range(len(inputs)))),
            self.kv_cache,
        )

    def _slot(self, block_ids: tuple[int, ...], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
