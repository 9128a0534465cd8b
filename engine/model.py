"""The forward pass over the paged KV cache, one for every family of engine/architectures.py.

One function per phase, over packed tensors (T = tokens in the batch, B = sequences):

    forward(tokens [T], positions [T], slots [T], attention, logit_rows [B]) -> logits [B, vocab]

`slots` says where each token's K and V are written (block * block_size + offset);
`attention` is either a `PrefillAttention` (packed sequences of different lengths,
each possibly the tail of a longer context already in the cache: chunked prefill)
or a `DecodeAttention` (one new token per sequence, reading its blocks in place).
Only the rows in `logit_rows` reach the vocabulary projection.

What differs between families is read from the spec's `Architecture` (norm
style, q/k norm, sandwich norms, embedding scale) and `LayerSpec`s (sliding
window, rope table); the layer objects (engine/layers.py) hold the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import itertools

import torch
import torch.nn.functional as F

from .copies import on_device
from .kernels.paged_attention import paged_decode_attention
from .kernels.prefill_attention import prefill_attention_varlen
from .kernels.qk_norm_rope import qk_norm_rope_
from .kernels.rms_norm import rms_norm_heads_
from .kernels.rope import apply_rope, build_cos_sin_cache
from .kv_cache import KvCache, KvStore
from .loader import LayerWeights, LoadedModel
from .model_spec import ModelSpec, rope_frequencies
from .parallel import TensorParallel


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
    max_context_len: int | None = None  # a host-side bound, sizes the kernel's context split


LayerHook = Callable[[int], None]


@dataclass(frozen=True)
class PrefillPlan:
    """A PrefillAttention's device tensors, made once per forward: a host -> device copy
    inside the layer loop would wait for the GPU to drain before every layer. The prefill
    graphs (engine/prefill_graphs.py) pass their own, over static tensors."""

    cu_q: torch.Tensor  # [B + 1] int32
    max_q: int
    cu_k: torch.Tensor | None  # [B + 1] int32 when some sequence has a cached prefix
    block_ids: tuple[torch.Tensor, ...]  # per sequence, the blocks holding its context
    context_lens: tuple[int, ...]

    @staticmethod
    def of(attention: PrefillAttention, block_size: int, device: torch.device) -> "PrefillPlan":
        cu_q = _cumulative(attention.q_lens, device)
        if not attention.has_cached_prefix:
            return PrefillPlan(cu_q, max(attention.q_lens), None, (), ())
        ids = [table[:-(-context // block_size)] for table, context in zip(attention.block_tables, attention.context_lens)]
        flat = on_device([i for seq in ids for i in seq], torch.long, device)
        return PrefillPlan(cu_q, max(attention.q_lens), _cumulative(attention.context_lens, device),
                            tuple(flat.split([len(seq) for seq in ids])), attention.context_lens)


class Model:
    """Weights plus the rope tables; stateless otherwise (the KV cache is passed in)."""

    def __init__(self, loaded: LoadedModel, tp: TensorParallel | None = None):
        """`tp`: the rank's TP group (None: alone); `loaded` must hold this rank's shard."""
        self.spec: ModelSpec = loaded.spec
        self.tp = tp or TensorParallel.single()
        if (self.tp.rank, self.tp.size) != (loaded.layout.rank, loaded.layout.size):
            raise ValueError(f"weights of TP rank {loaded.layout.rank}/{loaded.layout.size} "
                             f"given to rank {self.tp.rank}/{self.tp.size}")
        self.num_heads, self.num_kv_heads = loaded.layout.num_heads, loaded.layout.num_kv_heads  # this rank's
        self.vocab_parallel = loaded.layout.is_vocab_parallel
        self.family = loaded.spec.family
        self.weights = loaded.weights
        self.dtype = loaded.dtype
        self.device = loaded.device
        self.cos_sin: dict[str, torch.Tensor] = {}  # per rope table named by the layers, [max_len, rotary dims]
        for rope in sorted({layer.rope for layer in self.spec.layers}):
            inv_freq, scaling = rope_frequencies(loaded.hf_config, self.device, rope)
            self.cos_sin[rope] = build_cos_sin_cache(inv_freq, self.spec.max_model_len, scaling)
        # Gemma rounds sqrt(hidden) to the compute dtype before scaling the embeddings; Granite multiplies them
        self.embed_scale = (torch.tensor(self.spec.hidden_size ** 0.5, dtype=self.dtype).item()
                            if self.family.scale_embeddings else self.spec.embedding_multiplier)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention: PrefillAttention | PrefillPlan | DecodeAttention,
        logit_rows: torch.Tensor,
        kv_cache: KvCache,
        on_layer_done: LayerHook | None = None,
    ) -> torch.Tensor:
        if isinstance(attention, PrefillAttention):
            attention = PrefillPlan.of(attention, kv_cache.spec.block_size, tokens.device)
        hidden = F.embedding(tokens, self.weights.embed)  # [T, hidden]
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        residual = None
        for index, layer in enumerate(self.weights.layers):
            if residual is None:
                residual, normed = hidden, layer.input_norm(hidden)
            else:  # residual += hidden, in place
                normed, residual = layer.input_norm.add(hidden, residual)
            # o and the MLP's last projection are row-parallel: partial sums until all-reduced
            hidden = self.tp.all_reduce(self._attention(index, layer, normed, positions, slots, attention, kv_cache))
            if layer.post_attn_norm is not None:
                hidden = layer.post_attn_norm(hidden)
            normed, residual = layer.pre_mlp_norm.add(self._scaled_branch(hidden), residual)
            hidden = self.tp.all_reduce(layer.mlp(normed))
            if layer.post_mlp_norm is not None:
                hidden = layer.post_mlp_norm(hidden)
            hidden = self._scaled_branch(hidden)
            if on_layer_done is not None:
                on_layer_done(index)
        rows = hidden.index_select(0, logit_rows)
        normed, _ = self.weights.norm.add(rows, residual.index_select(0, logit_rows))
        logits = self.weights.lm_head(normed)  # [B, vocab] (vocab-parallel: [B, vocab / size], gathered)
        if self.vocab_parallel:
            logits = self.tp.all_gather(logits, dim=-1)
        logits = logits.float()
        if self.spec.logits_scaling is not None:
            logits = logits / self.spec.logits_scaling
        cap = self.spec.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _scaled_branch(self, hidden: torch.Tensor) -> torch.Tensor:
        """An attention or MLP output as the residual stream adds it (Granite: times residual_multiplier)."""
        m = self.spec.residual_multiplier
        return hidden if m is None else hidden * m

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention: PrefillPlan | DecodeAttention,
        kv_cache: KvCache,
    ) -> torch.Tensor:
        spec, layer_spec = self.spec, self.spec.layers[index]
        head_dim, num_heads, num_kv_heads = spec.head_dim, self.num_heads, self.num_kv_heads
        qkv = layer.qkv(x)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(-1, num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, head_dim)
        cos_sin = self.cos_sin[layer_spec.rope]
        rotary = cos_sin.shape[1]  # the head dims rope turns: all, or the first `rotary` (partial rotary)
        qn, kn = layer.q_norm, layer.k_norm
        # all in place, on views of qkv
        if rotary < head_dim:  # partial rotary: rope turns the heads' leading dims, K is stored whole after it
            if qn is not None:
                rms_norm_heads_(q, qn.weight, qn.eps, qn.offset)
                rms_norm_heads_(k, kn.weight, kn.eps, kn.offset)
            apply_rope(q[..., :rotary], k[..., :rotary], positions, cos_sin)
            # K and V in one launch: [2, T, kv_heads, head_dim] views of qkv
            kv_cache.write(index, slots, qkv[:, q_size:].view(-1, 2, num_kv_heads, head_dim).transpose(0, 1))
        else:  # the rope launch (with the q/k norms, if any) also stores the new K and V at their slots
            store = KvStore(kv_cache, index, slots, v)
            if qn is not None:
                qk_norm_rope_(q, k, qn.weight, kn.weight, qn.eps, qn.offset, positions, cos_sin, store)
            else:
                apply_rope(q, k, positions, cos_sin, store)
        cache = kv_cache.layer(index)  # [2, num_blocks, block_size, kv_heads, head_dim]
        window = layer_spec.sliding_window
        if isinstance(attention, DecodeAttention):
            k_scale, v_scale = kv_cache.scales[index]
            out = paged_decode_attention(
                q, cache[0], cache[1], attention.block_tables, attention.context_lens, spec.scale,
                attention.max_context_len, window, k_scale, v_scale, spec.attn_logit_softcap,
            )
        else:
            out = self._prefill_attention(q, k, v, kv_cache, index, attention, window)
        return layer.o(out.reshape(-1, q_size))

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KvCache, index: int, plan: PrefillPlan,
        window: int | None,
    ) -> torch.Tensor:
        """Causal attention over the packed sequences; cached prefixes are read from their blocks."""
        scale, softcap = self.spec.scale, self.spec.attn_logit_softcap
        if plan.cu_k is None:
            return prefill_attention_varlen(q, k, v, plan.cu_q, plan.max_q, scale, window=window, softcap=softcap)
        gathered = [kv_cache.export_blocks(index, ids).flatten(1, 2)[:, :context]  # [2, context, kv_heads, head_dim]
                    for ids, context in zip(plan.block_ids, plan.context_lens)]
        k_all, v_all = kv_cache.dequantize(index, torch.cat(gathered, dim=1), q.dtype)  # [Tk, kv_heads, head_dim] each
        return prefill_attention_varlen(q, k_all, v_all, plan.cu_q, plan.max_q, scale, plan.cu_k, window, softcap)


def _cumulative(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[B + 1] int32 offsets of packed sequences."""
    return on_device([0, *itertools.accumulate(lengths)], torch.int32, device)

