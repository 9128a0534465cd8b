"""Loading model directories: clear errors for what the engine cannot run."""
import json

import pytest
import torch

from pdserve.engine.loader import ModelLoadError, load_model_dir, resolve_dtype
from pdserve.engine.model_spec import UnsupportedModel
from tiny_models import SLIDING_WINDOW, save_tiny_model


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model_dir(tmp_path / "nope")


def test_missing_weights(tmp_path):
    save_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model_dir(tmp_path)


def test_corrupt_weights(tmp_path):
    save_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model_dir(tmp_path)


def test_corrupt_config(tmp_path):
    save_tiny_model("llama", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config"):
        load_model_dir(tmp_path)


def test_unsupported_architecture(tmp_path):
    save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM"):
        load_model_dir(tmp_path)


def test_dtype_the_cpu_cannot_run():
    with pytest.raises(ModelLoadError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(ModelLoadError):
        resolve_dtype("int8", torch.device("cpu"))


def test_bfloat16_on_the_cpu_loads(tmp_path):
    save_tiny_model("mistral", tmp_path)
    loaded = load_model_dir(tmp_path, dtype="bfloat16")
    assert loaded.weights.embed.dtype == torch.bfloat16


def test_sliding_window_model_keeps_its_whole_context(tmp_path):
    """The window is applied in attention, not by capping the context at it."""
    save_tiny_model("mistral_sliding", tmp_path)
    spec = load_model_dir(tmp_path).spec
    assert spec.max_model_len == 256
    assert [layer.sliding_window for layer in spec.layers] == [SLIDING_WINDOW] * 3


def test_options_the_engine_cannot_run_are_refused(tmp_path):
    save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="mlp_bias"):
        load_model_dir(tmp_path)


def test_moe_experts_are_stacked(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    mlp = load_model_dir(tmp_path).weights.layers[0].mlp
    assert mlp.w13.shape == (4, 2 * 128, 64) and mlp.w2.shape == (4, 64, 128) and mlp.top_k == 2
