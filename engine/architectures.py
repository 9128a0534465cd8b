"""The model families the engine runs, each a declarative description of how it differs.

One forward pass (engine/model.py) serves every family; it reads an
`Architecture` for what sets a family apart (norm style, activation, q/k norm,
sandwich norms, embedding scale, MoE routing and weight names) and the
`LayerSpec`s of one model's config for what differs per layer (sliding window,
rope table, MoE or dense MLP). Adding a family is adding an entry here (and, for
a new kind of layer, the layer in engine/layers.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class ExpertNames:
    """Where an MoE block keeps its router and experts in the checkpoint: `{block}.gate.weight`,
    `{block}.experts.{e}.{gate|up|down}.weight`."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # the expert every token also goes through (`{block}.{shared}.{gate|up|down}_proj.weight`), and
    # the linear whose sigmoid weighs it (`{block}.{shared_gate}.weight`); None: none
    shared: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class Architecture:
    """What one family's forward pass does differently from Llama's."""

    name: str
    hf_classes: tuple[str, ...]  # config.architectures entries that mean this family
    model_types: tuple[str, ...]  # config.model_type values (configs without `architectures`)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): Gemma's (1 + w)
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each q and k head before rope (Qwen3, Gemma 3; GLM-4.5: use_qk_norm)
    sandwich_norms: bool = False  # also a norm after attention and after the MLP (Gemma 3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma 3)
    experts: ExpertNames | None = None  # MoE layers' checkpoint names; None: dense only
    grouped_routing: bool = False  # sigmoid scores, biased choice within groups (kernels/moe_routing.route_grouped)
    pre_mlp_norm: str = "post_attention_layernorm"  # the norm before the MLP, by checkpoint name
    # Multimodal classes whose text model this family runs (their config's text_config, their
    # weights under language_model.); images are not supported.
    text_model_of: tuple[str, ...] = ()


LLAMA = Architecture("llama", ("LlamaForCausalLM",), ("llama",))
QWEN2 = Architecture("qwen2", ("Qwen2ForCausalLM",), ("qwen2",))
MISTRAL = Architecture("mistral", ("MistralForCausalLM",), ("mistral",))
QWEN3 = Architecture("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True)
QWEN3_MOE = Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), qk_norm=True,
                         experts=ExpertNames())
QWEN2_MOE = Architecture("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",),
                         experts=ExpertNames(shared="shared_expert", shared_gate="shared_expert_gate"))
# GLM-4.5 / 4.6: q/k/v bias, partial rotary, optional q/k norm; dense first layers, then MoE layers with a
# shared expert and DeepSeek-V3's routing
GLM4_MOE = Architecture("glm4_moe", ("Glm4MoeForCausalLM",), ("glm4_moe",),
                        experts=ExpertNames(shared="shared_experts"), grouped_routing=True)
MIXTRAL = Architecture("mixtral", ("MixtralForCausalLM",), ("mixtral",),
                       experts=ExpertNames("block_sparse_moe", "w1", "w3", "w2"))
# Llama's layers; the config's multipliers (embeddings, residual branches, attention scale, logits divisor)
GRANITE = Architecture("granite", ("GraniteForCausalLM",), ("granite",))
# q/k/v and gate/up fused in the checkpoint (read apart by the loader); Phi-4-mini: partial rotary
PHI3 = Architecture("phi3", ("Phi3ForCausalLM",), ("phi3",))
# Gemma 3's norms and MLP without its q/k norm; attention scores soft-capped (attn_logit_softcapping)
GEMMA2 = Architecture("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), norm_offset=1.0, activation="gelu_tanh",
                      sandwich_norms=True, scale_embeddings=True, pre_mlp_norm="pre_feedforward_layernorm")
GEMMA3 = Architecture("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), norm_offset=1.0,
                      activation="gelu_tanh", qk_norm=True, sandwich_norms=True, scale_embeddings=True,
                      pre_mlp_norm="pre_feedforward_layernorm", text_model_of=("Gemma3ForConditionalGeneration",))

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (LLAMA, QWEN2, MISTRAL, QWEN3, QWEN2_MOE, QWEN3_MOE, GLM4_MOE, MIXTRAL, PHI3, GRANITE,
                        GEMMA2, GEMMA3)}
SUPPORTED_CLASSES = sorted(c for a in ARCHITECTURES.values() for c in a.hf_classes + a.text_model_of)
# transformers' names of the activations, by what the engine calls them
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does that another may not."""

    sliding_window: int | None  # keys a query sees, itself included; None: the whole context
    rope: str  # which rope table: FULL_ATTENTION or SLIDING_ATTENTION (Gemma 3 has one each)
    moe: bool  # a sparse MoE block instead of the dense MLP


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # top-k probabilities divided by their sum (Mixtral always; Qwen3-MoE: norm_topk_prob)
    shared_intermediate_size: int = 0  # of the shared expert beside the routed ones (Qwen2-MoE, GLM-4.5); 0: none
    grouped: bool = False  # Architecture.grouped_routing, with the next three
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0


def find_architecture(config: Any) -> Architecture | None:
    """The family of a transformers config, or None if the engine has none for it."""
    names = list(getattr(config, "architectures", None) or [])
    for arch in ARCHITECTURES.values():
        if any(name in arch.hf_classes for name in names):
            return arch
    model_type = getattr(config, "model_type", "")
    if not names:
        return next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    return None


def text_config(config: Any) -> Any:
    """The config of the model the engine runs: a multimodal wrapper's text_config, else the config itself."""
    names = set(getattr(config, "architectures", None) or [])
    if any(names & set(a.text_model_of) for a in ARCHITECTURES.values()):
        return config.get_text_config()
    return config


def layer_specs(config: Any, arch: Architecture) -> tuple[LayerSpec, ...]:
    """Each layer's window, rope table and MLP kind, from the config's layer_types and MoE fields."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral, Mixtral: one window (or none) for every layer
        types = [SLIDING_ATTENTION if window else FULL_ATTENTION] * config.num_hidden_layers
    return tuple(
        LayerSpec(
            sliding_window=int(window) if kind == SLIDING_ATTENTION and window else None,
            rope=SLIDING_ATTENTION if kind == SLIDING_ATTENTION else FULL_ATTENTION,
            moe=_is_moe_layer(config, arch, i),
        )
        for i, kind in enumerate(types)
    )


def moe_spec(config: Any, arch: Architecture) -> MoeSpec | None:
    if arch.experts is None:
        return None
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    inter = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    return MoeSpec(
        num_experts=int(num_experts),
        top_k=int(config.num_experts_per_tok),
        intermediate_size=inter,
        renormalize=bool(getattr(config, "norm_topk_prob", True)),
        shared_intermediate_size=_shared_intermediate_size(config, inter) if arch.experts.shared else 0,
        grouped=arch.grouped_routing,
        num_groups=int(getattr(config, "n_group", None) or 1),
        topk_groups=int(getattr(config, "topk_group", None) or 1),
        routed_scaling=float(getattr(config, "routed_scaling_factor", None) or 1.0),
    )


def _shared_intermediate_size(config: Any, expert_inter: int) -> int:
    """Qwen2-MoE names the shared expert's width; GLM-4.5 and DeepSeek count shared experts of the routed width."""
    width = getattr(config, "shared_expert_intermediate_size", None)
    return int(width) if width else expert_inter * int(getattr(config, "n_shared_experts", None) or 0)


def _is_moe_layer(config: Any, arch: Architecture, index: int) -> bool:
    """Mixtral: every layer. Qwen3-MoE: every decoder_sparse_step-th, except mlp_only_layers. GLM-4.5:
    from first_k_dense_replace on."""
    if arch.experts is None or index < (getattr(config, "first_k_dense_replace", None) or 0):
        return False
    if index in (getattr(config, "mlp_only_layers", None) or ()):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (index + 1) % step == 0
