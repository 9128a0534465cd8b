"""FP8 on one Hopper GPU: an FP8 checkpoint's decode and prefill against the FP8 floors, in one run.

    python benchmarks/fp8_speed.py --out DIR [--name fp8_speed_h200_DATE] [--layouts block,tensor]

Llama-3-8B shape, random bf16 weights quantized here into the Hugging Face FP8 layouts
(`block`: 128 x 128 `weight_scale_inv`, as Qwen3-FP8 / DeepSeek; `tensor`: one
`weight_scale` per tensor, AutoFP8 style); lm_head, embedding and norms stay bf16, as
in those checkpoints. The engine loads them through the loader's own path
(`_arrange` with an `Fp8Checkpoint`), so the projections are `Fp8Linear`s.

Ceilings, measured in the same run: device copy (bytes read + written, 2 GiB), bf16
matmul (8192^3) and FP8 matmul (8192^3 `torch._scaled_mm`, rowwise scales as the engine
uses, and tensorwise).

Per layout:
    accuracy      benchmarks/fp8_accuracy.py: each GEMM path against float64, and the FP8 engine
                  beside the bf16 engine against transformers fp32 on the dequantized weights
    decode B=1 and B=64, 1,024-token context, KV bf16 and fp8_e4m3
                  floor = bytes / copy rate: FP8 weights 1 B each (+ their fp32 scales),
                  bf16 lm_head and norms 2 B, KV read + written at its dtype
                  (target: <= 1.3x the floor at B=1)
    prefill 1 x 2,048 and 8 x 512    floor = FLOPs / FP8 matmul rate (rowwise)
    the same rows for the bf16 model of the same (dequantized) weights, for comparison
The decode GEMV's configs per matrix shape: benchmarks/fp8_gemv_sweep.py.
Writes DIR/NAME.md and DIR/NAME.json.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from engine_timing import (  # benchmarks/engine_timing.py: the shared timing helpers
    LOG, BlockSource, Counts, decode_inputs, gpu_ms, say, time_decode,
)
from fp8_accuracy import gemm_errors, model_errors
from pdserve.engine.fp8 import Fp8Checkpoint, Fp8Linear
from pdserve.engine.kernels import fp8_gemm
from pdserve.engine.loader import LoadedModel, _arrange
from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.runner import ModelRunner, PrefillChunk
from pdserve.engine.sharding import ShardLayout
from pdserve.engine.weight_reader import WeightReader
from shapes import LLAMA3_8B

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16
NUM_BLOCKS = 5000  # B=64 at 1k context, B=1, prefill 2k + 8 x 512, the correctness prompt
LAYOUTS = {"block": (128, 128), "tensor": None}


# ---------------------------------------------------------------- ceilings

def measure_ceilings() -> dict:
    n = 1 << 30
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_bps = 2 * src.numel() * 2 / (gpu_ms(functools.partial(dst.copy_, src), 3, 20) * 1e-3)
    del src, dst
    size = 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    bf16 = 2 * size ** 3 / (gpu_ms(functools.partial(torch.matmul, a, b), 5, 20) * 1e-3)
    a8, b8 = a.to(fp8_gemm.FP8_DTYPE), b.to(fp8_gemm.FP8_DTYPE)
    one = torch.ones((), device="cuda")
    rows, cols = torch.ones(size, 1, device="cuda"), torch.ones(1, size, device="cuda")
    tensorwise = functools.partial(torch._scaled_mm, a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    rowwise = functools.partial(torch._scaled_mm, a8, b8.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16)
    ceilings = dict(copy_bps=copy_bps, bf16_matmul_flops=bf16,
                    fp8_matmul_flops_rowwise=2 * size ** 3 / (gpu_ms(rowwise, 5, 20) * 1e-3),
                    fp8_matmul_flops_tensorwise=2 * size ** 3 / (gpu_ms(tensorwise, 5, 20) * 1e-3))
    del a, b, a8, b8
    torch.cuda.empty_cache()
    say("ceilings: " + ", ".join(f"{k} {v / 1e12:.1f} T" for k, v in ceilings.items()))
    return ceilings


# ---------------------------------------------------------------- models

def build_reference():
    import transformers

    config = transformers.LlamaConfig(**LLAMA3_8B, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return config, hf


def quantize(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale) in the checkpoint layout: a 0-d per-tensor scale, or [N / bn, K / bk] blocks."""
    w = weight.float()
    if block is None:
        scale = w.abs().amax().clamp(min=1e-12) / fp8_gemm.FP8_MAX
        return (w / scale).to(fp8_gemm.FP8_DTYPE), scale
    bn, bk = block
    n, k = w.shape
    grid = (-(-n // bn), -(-k // bk))
    padded = torch.nn.functional.pad(w, (0, grid[1] * bk - k, 0, grid[0] * bn - n))
    scale = padded.view(grid[0], bn, grid[1], bk).abs().amax(dim=(1, 3)).clamp(min=1e-12) / fp8_gemm.FP8_MAX
    return (w / fp8_gemm.dequantize(torch.ones_like(w), scale, bn, bk)).to(fp8_gemm.FP8_DTYPE), scale


def fp8_model(config, hf, layout: str) -> LoadedModel:
    """The engine's FP8 model of hf's weights; hf's projections are set to the dequantized values (the oracle)."""
    block = LAYOUTS[layout]
    checkpoint = Fp8Checkpoint(block)
    state = dict(hf.state_dict())
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if ".layers." in name and name.endswith("_proj.weight"):
                q, scale = quantize(param, block)
                stem = name.removesuffix("weight")
                state[name], state[stem + ("weight_scale_inv" if block else "weight_scale")] = q, scale
                param.copy_(checkpoint.weight(state, name).dequantize(param.dtype))
    spec = spec_from_config(config)
    shards = ShardLayout.of(spec)
    weights = _arrange(WeightReader.of_tensors(state), spec, shards, torch.bfloat16, torch.device("cuda"), checkpoint)
    assert isinstance(weights.layers[0].qkv, Fp8Linear), "the loader did not keep the projections FP8"
    return LoadedModel(Path(f"random-fp8-{layout}"), f"random-fp8-{layout}", spec, config, weights,
                       torch.bfloat16, torch.device("cuda"), shards)


def bf16_model(config, hf) -> LoadedModel:
    spec = spec_from_config(config)
    shards = ShardLayout.of(spec)
    weights = _arrange(WeightReader.of_tensors(dict(hf.state_dict())), spec, shards, torch.bfloat16, torch.device("cuda"))
    return LoadedModel(Path("random-bf16"), "random-bf16", spec, config, weights, torch.bfloat16,
                       torch.device("cuda"), shards)


def runner_for(loaded: LoadedModel, kv_dtype: str) -> ModelRunner:
    runner = ModelRunner(loaded, NUM_BLOCKS, BLOCK_SIZE, max_decode_batch=64, kv_cache_dtype=kv_dtype)
    for layer in runner.kv_cache.tensor:  # never time attention over zeros (normal_ has no FP8 kernel)
        layer.copy_(torch.randn(layer.shape, dtype=torch.bfloat16, device="cuda") * 0.5)
    return runner


# ---------------------------------------------------------------- byte and FLOP counts

def _linear_bytes(proj) -> int:
    if isinstance(proj, Fp8Linear):
        return proj.weight.weight.numel() + proj.weight.scale.numel() * 4
    return proj.weight.numel() * proj.weight.element_size()


def decode_bytes(runner: ModelRunner, batch: int, context: int) -> int:
    """Weights read once (FP8 at 1 B + scales, the rest at 2 B), KV of the context read and the new token's written."""
    w = runner.model.weights
    read = _linear_bytes(w.lm_head) + w.norm.weight.numel() * 2
    for layer in w.layers:
        read += sum(_linear_bytes(p) for p in (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down))
        read += (layer.input_norm.weight.numel() + layer.pre_mlp_norm.weight.numel()) * 2
    read += batch * runner.spec.hidden_size * 2  # the embedding rows
    return read + batch * (context + 1) * runner.kv_cache.spec.bytes_per_token


# ---------------------------------------------------------------- sections

def time_rows(label: str, runner: ModelRunner, ceilings: dict, rows: dict, with_prefill: bool) -> None:
    blocks = BlockSource(NUM_BLOCKS)
    vocab = runner.spec.vocab_size
    runner.capture_graphs()
    for batch in (1, 64):
        inputs = decode_inputs(blocks, batch, 1024, vocab)
        timed = time_decode(runner, inputs)
        bytes_ = decode_bytes(runner, batch, 1024)
        floor = bytes_ / ceilings["copy_bps"] * 1e3
        rows[f"{label}: decode B={batch}, ctx 1024"] = dict(ms=timed["ms"], wall_ms=timed["wall_ms"], floor_ms=floor,
                                                            bytes=bytes_, floor_kind="copy")
        say(f"{label} decode B={batch}: {timed['ms']:.3f} ms (floor {floor:.3f} ms, x{timed['ms'] / floor:.2f}), "
            f"wall {timed['wall_ms']:.3f} ms")
    if not with_prefill:
        return
    counts = Counts(runner.spec)
    rate = ceilings["fp8_matmul_flops_rowwise" if "fp8" in label.split(",")[0] else "bf16_matmul_flops"]
    for lengths in ([2048], [512] * 8):
        chunks = [PrefillChunk(tuple(torch.randint(0, vocab, (n,)).tolist()), 0, blocks.take(n)) for n in lengths]
        ms = gpu_ms(lambda: runner.prefill(chunks), warmup=2, iters=8)
        flops, _ = counts.prefill(lengths)
        floor = flops / rate * 1e3
        rows[f"{label}: prefill {len(lengths)} x {lengths[0]}"] = dict(ms=ms, floor_ms=floor, flops=flops,
                                                                       floor_kind="matmul")
        say(f"{label} prefill {len(lengths)} x {lengths[0]}: {ms:.2f} ms (floor {floor:.2f} ms, MFU {floor / ms:.2f})")


# ---------------------------------------------------------------- report

def write_report(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    c = results["ceilings"]
    lines = [f"# FP8 speed, {results['device']}, {results['date']}", "",
             f"Ceilings: copy {c['copy_bps'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
             f"{c['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, FP8 matmul {c['fp8_matmul_flops_rowwise'] / 1e12:.0f} "
             f"TFLOP/s rowwise ({c['fp8_matmul_flops_tensorwise'] / 1e12:.0f} tensorwise).", "",
             "Decode floor = bytes (weights once, FP8 at 1 B; KV at its dtype) / copy rate; prefill floor = FLOPs / "
             "the matmul rate of the weights' dtype (FP8 rowwise for FP8 rows). Target: FP8 decode B=1 <= 1.3x floor.",
             "", "| row | ms | floor ms | ratio to floor | host wall ms |", "|---|---|---|---|---|"]
    for row, r in results["rows"].items():
        wall = f"{r['wall_ms']:.3f}" if "wall_ms" in r else ""
        lines.append(f"| {row} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['ms'] / r['floor_ms']:.2f} | {wall} |")
    lines += ["", "Accuracy (benchmarks/fp8_accuracy.py): relative L2 error of logits rows; top1 = argmax agreement.",
              "Per GEMM: against float64 on the dequantized weight (the first layer's).", ""]
    for layout, acc in results["accuracy"].items():
        for name, row in acc.get("gemm", {}).items():
            lines.append(f"- {layout} {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
        for section, rows in acc.get("model", {}).items():
            for label, v in rows.items():
                lines.append(f"- {layout}, {section}: {label}: {json.dumps(v)}")
    if results["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in results["errors"]]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({**results, "log": LOG}, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=f"fp8_speed_{datetime.date.today().isoformat()}")
    parser.add_argument("--layouts", default="block,tensor")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 comparison rows")
    args = parser.parse_args()
    results = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M"), rows={},
                   accuracy={}, errors=[])
    results["ceilings"] = ceilings = measure_ceilings()
    config, hf = build_reference()

    def section(label: str, fn) -> None:  # one failing section is reported, the run goes on
        try:
            fn()
        except Exception as e:
            results["errors"].append(f"{label}: {type(e).__name__}: {e}"[:400])
            say(f"{label} FAILED:\n{traceback.format_exc()}")
        torch.cuda.empty_cache()

    for layout in args.layouts.split(","):
        loaded = fp8_model(config, hf, layout)  # hf now holds this layout's dequantized weights
        acc = results["accuracy"][f"fp8-{layout}"] = {}
        section(f"fp8-{layout} gemm accuracy", lambda: acc.__setitem__("gemm", gemm_errors(loaded)))
        section(f"fp8-{layout} model accuracy", lambda: acc.__setitem__(
            "model", model_errors(hf, bf16_model(config, hf), loaded)))
        for kv in ("auto", "fp8_e4m3"):
            runner = runner_for(loaded, kv)
            label = f"fp8-{layout} weights, KV {'bf16' if kv == 'auto' else kv}"
            section(label, lambda: time_rows(label, runner, ceilings, results["rows"], with_prefill=kv == "auto"))
            del runner
        del loaded
        torch.cuda.empty_cache()
    if not args.no_bf16:  # hf holds the last layout's dequantized weights
        runner = runner_for(bf16_model(config, hf), "auto")
        section("bf16", lambda: time_rows("bf16 weights, KV bf16", runner, ceilings, results["rows"], True))
        del runner
    write_report(results, args.out, args.name)


if __name__ == "__main__":
    sys.exit(main())
