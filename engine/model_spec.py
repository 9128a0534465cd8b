"""What the engine needs to know of a model, read from its transformers config.

Supported: the families of engine/architectures.py — Llama, Qwen2, Mistral, Qwen3,
Qwen3-MoE, Mixtral and Gemma 3 (text). Anything else is refused with
`UnsupportedModel`, naming what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .architectures import (
    ACTIVATIONS, ARCHITECTURES, SUPPORTED_CLASSES, Architecture, LayerSpec, MoeSpec, find_architecture,
    layer_specs, moe_spec,
)

# Rope variants whose frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}


class UnsupportedModel(ValueError):
    """The model directory holds an architecture or option the engine cannot run."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # a key of architectures.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLP
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    layers: tuple[LayerSpec, ...] = ()
    moe: MoeSpec | None = None
    attention_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcap: float | None = None  # the same on attention scores, before the softmax (Gemma 2)
    qk_norm: bool = False  # RMSNorm over each q and k head before rope (the family's, or the config's use_qk_norm)
    # Granite's multipliers: of the embeddings, of each attention and MLP output before the residual add,
    # and the divisor of the logits (None: 1)
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None

    @property
    def family(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def kv_window(self) -> int | None:
        """When every layer attends within a window: the widest, the most tokens of KV any later
        step reads (older blocks can be returned); None when some layer sees the whole context."""
        windows = [layer.sliding_window for layer in self.layers]
        if not windows or None in windows:
            return None
        return max(windows)

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    @property
    def num_params(self) -> int:
        """Parameters, for byte counts (every expert)."""
        return self._params(self.moe.num_experts if self.moe else 0)

    @property
    def num_active_params(self) -> int:
        """Parameters one token multiplies with (its top-k experts), for FLOP counts."""
        return self._params(self.moe.top_k if self.moe else 0)

    def _params(self, experts: int) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        dense = 3 * self.hidden_size * self.intermediate_size
        sparse = 0 if self.moe is None else (
            experts * 3 * self.hidden_size * self.moe.intermediate_size + self.moe.num_experts * self.hidden_size)
        mlps = sum(sparse if layer.moe else dense for layer in self.layers) if self.layers else self.num_layers * dense
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + 2 * self.hidden_size) + mlps + embed + self.hidden_size


def spec_from_config(config: Any, max_model_len: int | None = None) -> ModelSpec:
    """Check a transformers `PretrainedConfig` and turn it into a `ModelSpec`."""
    arch = find_architecture(config)
    if arch is None:
        names = list(getattr(config, "architectures", None) or []) or getattr(config, "model_type", "?")
        raise UnsupportedModel(f"architecture {names!r} is not supported; supported: {SUPPORTED_CLASSES}")
    layers = layer_specs(config, arch)
    for rope in sorted({layer.rope for layer in layers}):
        rope_type = rope_parameters(config, rope).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(f"rope type {rope_type!r} is not supported; supported: {sorted(SUPPORTED_ROPE_TYPES)}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = rotary_dim(config, rope)
        if rotary % 2 or rotary > head_dim:
            raise UnsupportedModel(f"{arch.name}: rope over {rotary} of {head_dim} head dims is not supported")
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if ACTIVATIONS.get(activation) != arch.activation:
        raise UnsupportedModel(f"{arch.name}: hidden activation {activation!r} is not supported "
                               f"(only {[k for k, v in ACTIVATIONS.items() if v == arch.activation]})")
    _refuse_options(config)
    context = int(config.max_position_embeddings)
    if max_model_len is not None:
        if max_model_len > context:
            raise UnsupportedModel(f"max_model_len {max_model_len} exceeds the model's context of {context} tokens")
        context = max_model_len
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scalar = getattr(config, "query_pre_attn_scalar", None)
    multiplier = getattr(config, "attention_multiplier", None)  # Granite: the scale itself
    return ModelSpec(
        architecture=arch.name,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        max_model_len=context,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(config),
        layers=layers,
        moe=moe_spec(config, arch),
        attention_scale=float(multiplier) if multiplier else float(scalar) ** -0.5 if scalar else None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        qk_norm=arch.qk_norm or bool(getattr(config, "use_qk_norm", False)),
        embedding_multiplier=_multiplier(config, "embedding_multiplier"),
        residual_multiplier=_multiplier(config, "residual_multiplier"),
        logits_scaling=_multiplier(config, "logits_scaling"),
    )


def _multiplier(config: Any, name: str) -> float | None:
    """A config's multiplier, None where it is absent or 1 (nothing to multiply)."""
    value = getattr(config, name, None)
    return float(value) if value not in (None, 1, 1.0) else None


def _refuse_options(config: Any) -> None:
    """Config switches that would change the outputs in ways the engine does not implement."""
    for option in ("mlp_bias", "use_bidirectional_attention"):
        if getattr(config, option, False):
            raise UnsupportedModel(f"{option}=True is not supported")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters` (Gemma 3: one dict per layer type);
    older configs in `rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rotary_dim(config: Any, layer_type: str | None = None) -> int:
    """The leading dims of each head that rope rotates: all of them, or `partial_rotary_factor` of them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = rope_parameters(config, layer_type).get("partial_rotary_factor",
                                                     getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * factor)


def rope_frequencies(config: Any, device: torch.device | str = "cpu", layer_type: str | None = None
                     ) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2], attention scaling) of one layer type, from transformers' own rope table."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = rotary_dim(config, layer_type)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq.to(device), 1.0
    per_type = isinstance((getattr(config, "rope_parameters", None) or {}).get(layer_type), dict)
    kwargs = {"layer_type": layer_type} if per_type else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    return inv_freq.float(), float(scaling)


def _eos_ids(config: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
