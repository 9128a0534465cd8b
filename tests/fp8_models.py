"""Tiny models saved in the Hugging Face FP8 checkpoint layouts (quantized here), for the FP8 tests."""
import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.fp8 import Fp8Checkpoint
from tiny_models import save_tiny_model

FP8 = torch.float8_e4m3fn

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
    return quantize_saved_model(save_tiny_model(arch, directory, **overrides), directory, layout)


def quantize_saved_model(model, directory, layout: str):
    """Rewrite the model saved in `directory` into `layout`; returns the transformers model of the
    dequantized weights (loaded from a dequantized copy beside `directory`, so checkpoint names map to the
    model's parameters as transformers itself maps them, stacked MoE experts included)."""
    quant_config, scale_name, block, per_channel = LAYOUTS[layout]
    file = directory / "model.safetensors"
    tensors = load_file(file)
    dequantized = dict(tensors)
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        # 32 x 32 tiles of different magnitudes (x0.5..2), so a scale applied to the wrong block shows
        n, k = tensors[name].shape
        tiles = 2.0 ** (torch.rand(-(-n // 32), -(-k // 32), generator=gen) * 2 - 1)
        weight = tensors[name] * tiles.repeat_interleave(32, 0)[:n].repeat_interleave(32, 1)[:, :k]
        q, scale = quantize(weight, block, per_channel)
        tensors[name], tensors[name.removesuffix("weight") + scale_name] = q, scale
        if layout == "fp8-tensor":
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor(0.02)  # static: x / 0.02, up to |x| = 9
        dequantized[name] = Fp8Checkpoint(block).weight(tensors, name).dequantize()
    oracle_dir = directory.parent / f"{directory.name}-dequantized"
    oracle_dir.mkdir(exist_ok=True)
    shutil.copy(directory / "config.json", oracle_dir / "config.json")
    save_file(dequantized, oracle_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quant_config
    (directory / "config.json").write_text(json.dumps(config))
    return type(model).from_pretrained(oracle_dir).eval()
