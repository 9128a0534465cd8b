"""Short prefills replayed from CUDA graphs against the same prefills launched from Python, on one GPU.

    python benchmarks/prefill_graphs.py --out DIR [--shape llama3-8b] [--batches 16,64,128,256,512,4x128]

Random bf16 weights of the shape (benchmarks/shapes.py). For each batch (N: one prompt
of N tokens; SxN: S prompts of N tokens), with no cached prefix: the GPU's time (CUDA events) and the host's wall time
(launch + synchronize) of `ModelRunner.prefill`, with the prefill graphs and without,
and the floor: the larger of the weights read once at the copy rate and the prompt's
FLOPs at the matmul rate (both measured in the same run). The issue's target: a
128-token prefill of the 8B shape within 1.3x its floor. Writes DIR/prefill_graphs.md.
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from engine_timing import BlockSource, build_models, gpu_ms, measure_ceilings, wall_ms
from pdserve.engine.runner import PrefillChunk


def without_embedding(spec, params: int) -> int:
    """`params` (the spec's count) less the input embedding a prefill only gathers rows of (tied: it is
    the vocabulary projection, read whole)."""
    return params - (0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batches", default="16,64,128,256,512,2x128,4x128")
    args = parser.parse_args()
    copy_bps, matmul_flops = measure_ceilings()
    _, runner = build_models(1200, args.shape)
    graphs = runner.prefill_graphs
    spec = runner.spec
    params = without_embedding(spec, spec.num_active_params)  # FLOPs: the experts a token runs
    read_s = without_embedding(spec, spec.num_params) * runner.model.dtype.itemsize / copy_bps
    blocks = BlockSource(1200)
    lines = [f"# Prefill from CUDA graphs, {torch.cuda.get_device_name()}, {datetime.date.today()}", "",
             f"{args.shape}, bf16; copy {copy_bps / 1e12:.2f} TB/s, matmul {matmul_flops / 1e12:.0f} TFLOP/s; "
             "floor = max(weights once / copy, 2 x params x tokens / matmul)", "",
             "| prompts x tokens | floor ms | graph GPU ms | graph wall ms | eager GPU ms | eager wall ms | graph wall / floor |",
             "|---|---|---|---|---|---|---|"]
    for batch in args.batches.split(","):
        seqs, _, length = batch.rpartition("x")
        seqs, length = int(seqs or 1), int(length)
        chunk = [PrefillChunk(tuple(range(7 + s, 7 + s + length)), 0, blocks.take(length)) for s in range(seqs)]
        floor_ms = 1e3 * max(read_s, 2 * params * seqs * length / matmul_flops)
        times = []
        for runner.prefill_graphs in (graphs, None):  # the same runner, with its prefill graphs and without
            times.append(gpu_ms(lambda: runner.prefill(chunk), warmup=3, iters=20))
            times.append(wall_ms(lambda: runner.prefill(chunk), warmup=1, iters=20))
        runner.prefill_graphs = graphs
        lines.append(f"| {batch} | {floor_ms:.2f} | " + " | ".join(f"{t:.2f}" for t in times)
                     + f" | {times[1] / floor_ms:.2f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_graphs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
