"""What the engine needs to know of a model, read from its transformers config.

Supported: the Llama family — Llama, Qwen2 (q/k/v bias) and Mistral. Anything
else is refused with `UnsupportedModel`, naming what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# Rope variants whose frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}


class UnsupportedModel(ValueError):
    """The model directory holds an architecture or option the engine cannot run."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @property
    def num_params(self) -> int:
        """Parameters, for FLOP and byte counts."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size


def spec_from_config(config: Any, max_model_len: int | None = None) -> ModelSpec:
    """Check a transformers `PretrainedConfig` and turn it into a `ModelSpec`."""
    architecture = _architecture(config)
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported; supported: {sorted(SUPPORTED_ROPE_TYPES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    context = int(config.max_position_embeddings)
    context = min(context, _sliding_window_limit(config))
    if max_model_len is not None:
        if max_model_len > context:
            raise UnsupportedModel(f"max_model_len {max_model_len} exceeds the model's context of {context} tokens")
        context = max_model_len
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        architecture=architecture,
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
    )


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in `rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_frequencies(config: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling), from transformers' own rope table."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = rope_parameters(config)["rope_type"]
    if rope_type == "default":
        theta = rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq.to(device), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
    return inv_freq.float(), float(scaling)


def _architecture(config: Any) -> str:
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if not names and model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise UnsupportedModel(
        f"architecture {names or model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _sliding_window_limit(config: Any) -> int:
    # The engine attends over the whole context; a sliding window shorter than the
    # context would change the outputs, so the context is capped at the window.
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return int(window) if window else 1 << 30


def _eos_ids(config: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
