"""FP8 checkpoints: tiny models quantized here into the Hugging Face FP8 layouts, loaded by the
engine, against transformers on the dequantized weights.

On the CPU the loader dequantizes (W = q * s), so logits match to fp32 rounding and greedy
tokens are equal. The FP8 GEMM's numerics (activations quantized per token, and per
128-group for block weights, as on a GPU) are checked by swapping in the FP8 Linears,
which off CUDA run their torch reference: logits within FP8_GEMM_LOGITS_TOL.
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_target import assert_logits_close, relative_error
from pdserve.engine.fp8 import Fp8Checkpoint, Fp8Linear
from pdserve.engine.loader import ModelLoadError, load_model_dir, read_model_spec
from pdserve.engine.model_spec import UnsupportedModel
from pdserve.engine.offline import OfflineEngine, OfflineSequence
from pdserve.engine.runner import ModelRunner, PrefillChunk
from tiny_models import reference_tokens, save_tiny_model

FP8 = torch.float8_e4m3fn
PROMPTS = [[5, 17, 33, 2, 90, 11, 7], [100, 101, 102, 103, 104, 105, 106, 3]]
# Relative L2 error of a row of logits when both GEMM operands are e4m3 (3 mantissa bits: about
# 3.6% RMS rounding per activation, in 15 GEMMs): measured 4-7% on these 3-layer random models
# (init 0.05). The weights' 32 x 32 tiles differ in magnitude, so a scale on the wrong block
# shows: block rows swapped give 65%.
FP8_GEMM_LOGITS_TOL = 0.12

# layout name -> (quantization_config, scale tensor name, block size or None, per-channel)
LAYOUTS = {
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "static"}, "weight_scale", None, False),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                   "weight_block_size": [32, 32]}, "weight_scale_inv", (32, 32), False),
    "ct-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                        "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True}}}},
                   "weight_scale", None, True),
}


def quantize(weight: torch.Tensor, block: tuple[int, int] | None, per_channel: bool):
    """(fp8 weight, scale) as the checkpoints store them; W ~= q * s."""
    n, k = weight.shape
    if block is None:
        amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
        scale = amax.clamp(min=1e-12) / 448.0
        return (weight / scale).to(FP8), scale.float()
    bn, bk = block
    grid = (-(-n // bn), -(-k // bk))
    padded = torch.nn.functional.pad(weight, (0, grid[1] * bk - k, 0, grid[0] * bn - n))
    scale = padded.view(grid[0], bn, grid[1], bk).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (weight / full).to(FP8), scale


def save_fp8_model(arch: str, directory, layout: str, **overrides):
    """A tiny model saved in `layout` (every decoder projection FP8, lm_head and norms not);
    returns the transformers model holding the dequantized weights (the oracle)."""
    quant_config, scale_name, block, per_channel = LAYOUTS[layout]
    model = save_tiny_model(arch, directory, **overrides)
    file = directory / "model.safetensors"
    tensors = load_file(file)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        # 32 x 32 tiles of different magnitudes (x0.5..2), so a scale applied to the wrong block shows
        n, k = tensors[name].shape
        tiles = 2.0 ** (torch.rand(-(-n // 32), -(-k // 32), generator=gen) * 2 - 1)
        weight = tensors[name] * tiles.repeat_interleave(32, 0)[:n].repeat_interleave(32, 1)[:, :k]
        q, scale = quantize(weight, block, per_channel)
        tensors[name], tensors[name.removesuffix("weight") + scale_name] = q, scale
        if layout == "fp8-tensor":
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor(0.02)  # static, ignored
        with torch.no_grad():
            params[name].copy_(Fp8Checkpoint(block).weight(tensors, name).dequantize())
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quant_config
    (directory / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module", params=["llama:fp8-tensor", "llama:fp8-block", "qwen2:fp8-block", "llama:ct-channel"])
def fp8_model(request, tmp_path_factory):
    arch, layout = request.param.split(":")
    directory = tmp_path_factory.mktemp("fp8") / layout
    return layout, directory, save_fp8_model(arch, directory, layout, initializer_range=0.05)


def prefill_logits(runner: ModelRunner) -> torch.Tensor:
    chunks, next_block = [], 0
    for prompt in PROMPTS:
        count = -(-len(prompt) // 4)
        chunks.append(PrefillChunk(tuple(prompt), 0, tuple(range(next_block, next_block + count))))
        next_block += count
    return runner.prefill(chunks)


def test_loaded_fp8_checkpoint_matches_transformers_on_dequantized_weights(fp8_model):
    _, directory, reference = fp8_model
    loaded = load_model_dir(directory)
    logits = prefill_logits(ModelRunner(loaded, num_blocks=16, block_size=4))
    for row, prompt in enumerate(PROMPTS):
        assert_logits_close(logits[row], reference(torch.tensor([prompt])).logits[0, -1])
    engine = OfflineEngine(loaded, num_blocks=32, block_size=4)
    sequences = [OfflineSequence(prompt, max_tokens=12) for prompt in PROMPTS]
    list(engine.generate(sequences, ignore_eos=True))
    reference.generation_config.eos_token_id = None
    for seq in sequences:
        assert seq.output == reference_tokens(reference, seq.prompt, 12)


def test_fp8_gemm_numerics_stay_close(fp8_model):
    """The projections as FP8 Linears (activation quantization included) instead of dequantized ones."""
    layout, directory, reference = fp8_model
    loaded = load_model_dir(directory)
    checkpoint = Fp8Checkpoint(LAYOUTS[layout][2])
    tensors = load_file(directory / "model.safetensors")

    def fp8(names, bias=None):
        made = checkpoint.linear(tensors, names, bias, torch.device("cpu"))
        assert isinstance(made, Fp8Linear) and made.weight.weight.dtype == FP8
        return made

    layers = []
    for i, layer in enumerate(loaded.weights.layers):
        p = f"model.layers.{i}."
        layers.append(dataclasses.replace(
            layer,
            qkv=fp8([f"{p}self_attn.{n}_proj.weight" for n in "qkv"], layer.qkv.bias),
            o=fp8([f"{p}self_attn.o_proj.weight"]),
            mlp=dataclasses.replace(layer.mlp, gate_up=fp8([f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"]),
                                    down=fp8([f"{p}mlp.down_proj.weight"])),
        ))
    quantized = dataclasses.replace(loaded, weights=dataclasses.replace(loaded.weights, layers=tuple(layers)))
    logits = prefill_logits(ModelRunner(quantized, num_blocks=16, block_size=4))
    for row, prompt in enumerate(PROMPTS):
        assert relative_error(logits[row], reference(torch.tensor([prompt])).logits[0, -1]) < FP8_GEMM_LOGITS_TOL


def test_unsupported_quantization_is_refused_clearly(tmp_path):
    save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="quantization method 'gptq' is not supported"):
        read_model_spec(tmp_path)  # what `pdserve serve` checks before deploying
    with pytest.raises(UnsupportedModel, match="quantization method 'gptq'"):
        load_model_dir(tmp_path)


def test_a_scale_that_fits_no_layout_is_refused_clearly(tmp_path):
    save_fp8_model("llama", tmp_path, "fp8-block")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, file)
    with pytest.raises(ModelLoadError, match="down_proj.weight: scale of shape \\(3, 3\\) fits no FP8 layout"):
        load_model_dir(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FP8 kernels run on CUDA (Hopper)")
def test_on_cuda_the_projections_stay_fp8_and_stay_close(fp8_model):
    """The loader's CUDA path: Fp8Linear projections (FP8 GEMV for decode, FP8 GEMM for prefill) in bf16."""
    _, directory, reference = fp8_model
    loaded = load_model_dir(directory, "cuda", "bfloat16")
    assert isinstance(loaded.weights.layers[0].qkv, Fp8Linear)
    logits = prefill_logits(ModelRunner(loaded, num_blocks=16, block_size=4, use_cuda_graphs=False))
    for row, prompt in enumerate(PROMPTS):
        assert relative_error(logits[row], reference(torch.tensor([prompt])).logits[0, -1]) < FP8_GEMM_LOGITS_TOL
    engine = OfflineEngine(loaded, num_blocks=32, block_size=4)
    sequence = OfflineSequence(PROMPTS[0], max_tokens=8)
    list(engine.generate([sequence], ignore_eos=True))  # decode steps through the FP8 GEMV and CUDA graphs
    assert len(sequence.output) == 8 and engine.pool.num_free == engine.pool.num_blocks
