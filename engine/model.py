"""The Llama-family forward pass over the paged KV cache.

One function per phase, over packed tensors (T = tokens in the batch, B = sequences):

    forward(tokens [T], positions [T], slots [T], attention, logit_rows [B]) -> logits [B, vocab]

`slots` says where each token's K and V are written (block * block_size + offset);
`attention` is either a `PrefillAttention` (packed sequences of different lengths,
each possibly the tail of a longer context already in the cache: chunked prefill)
or a `DecodeAttention` (one new token per sequence, reading its blocks in place).
Only the rows in `logit_rows` reach the vocabulary projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .kv_cache import KvCache
from .loader import LayerWeights, LoadedModel
from .model_spec import ModelSpec, rope_frequencies


@dataclass(frozen=True)
class PrefillAttention:
    """Packed prefill: sequence i's new tokens are tokens[q_starts[i] : q_starts[i] + q_lens[i]]."""

    q_starts: tuple[int, ...]
    q_lens: tuple[int, ...]
    context_lens: tuple[int, ...]  # tokens of KV after this step (cached prefix + new)
    block_tables: tuple[tuple[int, ...], ...]

    @property
    def has_cached_prefix(self) -> bool:
        return any(c != q for c, q in zip(self.context_lens, self.q_lens))


@dataclass(frozen=True)
class DecodeAttention:
    """One query token per sequence."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, including the new token


LayerHook = Callable[[int], None]


class LlamaModel:
    """Weights plus the rope table; stateless otherwise (the KV cache is passed in)."""

    def __init__(self, loaded: LoadedModel):
        self.spec: ModelSpec = loaded.spec
        self.weights = loaded.weights
        self.dtype = loaded.dtype
        self.device = loaded.device
        inv_freq, scaling = rope_frequencies(loaded.hf_config, self.device)
        positions = torch.arange(self.spec.max_model_len, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_len, head_dim / 2]
        # [max_len, head_dim]: cos in the first half, sin in the second, as the kernels take it.
        self.cos_sin = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.scale = self.spec.head_dim ** -0.5

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention: PrefillAttention | DecodeAttention,
        logit_rows: torch.Tensor,
        kv_cache: KvCache,
        on_layer_done: LayerHook | None = None,
    ) -> torch.Tensor:
        spec = self.spec
        hidden = F.embedding(tokens, self.weights.embed)  # [T, hidden]
        residual = None
        for index, layer in enumerate(self.weights.layers):
            if residual is None:
                residual, normed = hidden, ops.rms_norm(hidden, layer.input_norm, spec.rms_norm_eps)
            else:
                normed, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, spec.rms_norm_eps)
            hidden = self._attention(index, layer, normed, positions, slots, attention, kv_cache)
            normed, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, spec.rms_norm_eps)
            hidden = F.linear(ops.silu_and_mul(F.linear(normed, layer.gate_up)), layer.down)
            if on_layer_done is not None:
                on_layer_done(index)
        rows = hidden.index_select(0, logit_rows)
        normed, _ = ops.add_rms_norm(rows, residual.index_select(0, logit_rows), self.weights.norm, spec.rms_norm_eps)
        return F.linear(normed, self.weights.lm_head).float()  # [B, vocab]

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention: PrefillAttention | DecodeAttention,
        kv_cache: KvCache,
    ) -> torch.Tensor:
        spec = self.spec
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        q = qkv[:, :q_size].view(-1, spec.num_heads, spec.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, spec.num_kv_heads, spec.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, spec.num_kv_heads, spec.head_dim)
        q, k = ops.apply_rope(q, k, positions, self.cos_sin)
        cache = kv_cache.layer(index)  # [2, num_blocks, block_size, kv_heads, head_dim]
        flat = cache.view(2, -1, spec.num_kv_heads, spec.head_dim)
        flat[0].index_copy_(0, slots, k)
        flat[1].index_copy_(0, slots, v)
        if isinstance(attention, DecodeAttention):
            out = ops.paged_decode_attention(
                q, cache[0], cache[1], attention.block_tables, attention.context_lens, self.scale
            )
        else:
            out = self._prefill_attention(q, k, v, cache, attention)
        return F.linear(out.reshape(-1, q_size), layer.o, layer.o_bias)

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, attention: PrefillAttention
    ) -> torch.Tensor:
        """Causal attention per packed sequence; a cached prefix is read from its blocks."""
        outputs = []
        for start, q_len, context, table in zip(
            attention.q_starts, attention.q_lens, attention.context_lens, attention.block_tables
        ):
            q_i = q[start:start + q_len]
            if context == q_len:
                k_i, v_i = k[start:start + q_len], v[start:start + q_len]
            else:
                k_i, v_i = _gather_context(cache, table, context)
            outputs.append(ops.causal_attention(q_i, k_i, v_i, self.scale))
        return torch.cat(outputs)


def _gather_context(cache: torch.Tensor, table: tuple[int, ...], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `context` tokens' K and V of one sequence, [context, kv_heads, head_dim] each."""
    block_size = cache.shape[2]
    num_blocks = -(-context // block_size)
    ids = torch.tensor(table[:num_blocks], device=cache.device)
    blocks = cache.index_select(1, ids)  # [2, n, block_size, kv_heads, head_dim]
    kv = blocks.flatten(1, 2)[:, :context]
    return kv[0], kv[1]
