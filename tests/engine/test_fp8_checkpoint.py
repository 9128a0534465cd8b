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
from fp8_models import save_fp8_model
from pdserve.engine.fp8 import Fp8Checkpoint, Fp8Linear
from pdserve.engine.layers import GatedMlp
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

@pytest.fixture(scope="module", params=["llama:fp8-tensor", "llama:fp8-block", "qwen2:fp8-block", "llama:ct-channel",
                                        "qwen3_moe:fp8-block"])  # MoE: FP8 experts, dequantized at load
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
    if not isinstance(loaded.weights.layers[0].mlp, GatedMlp):
        pytest.skip("MoE experts are dequantized at load: no FP8 Linear in their MLP")
    checkpoint = Fp8Checkpoint.of(loaded.hf_config)  # fp8-tensor: static activation scales (input_scale)
    assert checkpoint.static_activations == (layout == "fp8-tensor")
    tensors = load_file(directory / "model.safetensors")

    def fp8(names, bias=None):
        made = checkpoint.linear(tensors, names, bias, torch.device("cpu"))
        assert isinstance(made, Fp8Linear) and made.weight.weight.dtype == FP8
        assert (made.weight.input_scale is not None) == checkpoint.static_activations
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
