"""Where a graphed decode step's GPU time goes, kernel by kernel, and how far each kind sits from its bytes.

    python benchmarks/decode_kernels.py --out DIR [--models qwen3-30b-a3b,llama3-8b,llama3-8b-fp8] [--batches 1,64]

Random bf16 weights of benchmarks/shapes.py's shapes (`-fp8`: the Llama-3-8B projections quantized per
tensor, as benchmarks/fp8_speed.py does). For each model and batch, at a 1,024-token context: the
replayed CUDA graph's time (CUDA events), then one replay under the profiler: every kernel's
summed time, its launches and time per launch, largest first. The gap between the replay and
the summed kernels is the GPU idle between kernels. Writes DIR/decode_kernels.md.
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from engine_timing import BlockSource, build_models, decode_inputs, say, time_decode
from fp8_speed import fp8_model, runner_for

NUM_BLOCKS = 5000


def kernel_table(graph) -> tuple[float, list[tuple[str, float, int]]]:
    """(summed ms, [(kernel, ms, launches)]) of one replay of `graph`."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name[:70], [0.0, 0])
            entry[0] += event.device_time_total / 1e3
            entry[1] += 1
    rows = sorted(((k, ms, n) for k, (ms, n) in totals.items()), key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows


def profile_runner(name: str, runner, batches: list[int], lines: list[str]) -> None:
    blocks = BlockSource(NUM_BLOCKS)
    runner.capture_graphs()
    for batch in batches:
        inputs = decode_inputs(blocks, batch, 1024, runner.spec.vocab_size)
        timed = time_decode(runner, inputs)
        graph = runner.decode_graphs._graphs[runner.decode_graphs.size_for(batch)]
        summed, rows = kernel_table(graph)
        launches = sum(r[2] for r in rows)
        head = (f"## {name}, decode B={batch}, ctx 1024: replay {timed['ms']:.3f} ms, kernels summed {summed:.3f} ms "
                f"({launches} launches; idle between them {timed['ms'] - summed:.3f} ms)")
        say(head)
        lines += ["", head, "", "| kernel | ms | launches | us each |", "|---|---|---|---|"]
        for kernel, ms, n in rows[:24]:
            lines.append(f"| `{kernel}` | {ms:.3f} | {n} | {1e3 * ms / n:.1f} |")
            say(f"    {ms:7.3f} ms x {n:4d} {1e3 * ms / n:6.1f} us  {kernel}")


def build(model: str):
    """The runner of `model` (its transformers copy freed first: the GPU holds one 61 GB model at a time)."""
    shape = model.removesuffix("-fp8")
    hf, runner = build_models(NUM_BLOCKS, shape)
    if model.endswith("-fp8"):
        del runner
        torch.cuda.empty_cache()
        runner = runner_for(fp8_model(hf.config, hf, "tensor"), "auto")
    del hf
    torch.cuda.empty_cache()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="qwen3-30b-a3b,llama3-8b,llama3-8b-fp8")
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    lines = [f"# Decode kernels, {torch.cuda.get_device_name(0)}, {datetime.date.today().isoformat()}"]
    batches = [int(b) for b in args.batches.split(",")]
    for model in args.models.split(","):
        try:
            runner = build(model)
            profile_runner(model, runner, batches, lines)
        except Exception as e:  # one model failing leaves the others' tables
            lines += ["", f"## {model}: {type(e).__name__}: {e}"]
            say(lines[-1])
        runner = None
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
