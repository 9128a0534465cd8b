"""Engine speed on one GPU against its limits and against transformers `generate()`.

    python benchmarks/engine_speed.py --out DIR [--shape NAME] [--sweep] [--profile] [--name engine_speed_h100_DATE]

Llama-3-8B shape by default (--shape: a key of benchmarks/shapes.py MODELS, e.g.
qwen3-8b, qwen3-30b-a3b), bfloat16, random weights (the same weights for the engine and
the baseline). In one run it measures the two ceilings (a large device-to-device
copy, bytes read + written; a large bf16 matmul), times each row, and writes DIR/NAME.md
(the table), DIR/NAME.json and DIR/NAME.png (a roofline: achieved FLOP/s against
arithmetic intensity). The parts: engine_timing.py (clocks, ceilings, counts, the model),
engine_steps.py (what is timed), gemv_study.py, engine_report.py.

Correctness is the tests' (run them on the same GPU first):
    PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 pytest tests/engine/test_model_vs_transformers.py \
        tests/engine/test_full_width_bf16.py tests/kernels/test_gemv.py

Rows (time = median):
    decode  B=1,  1,024-token context   floor = bytes / copy rate   (weights + KV read; for an
                                        MoE only the experts the step's tokens were routed to)
    decode  B=64, 1,024-token context
    prefill 1 x 2,048 tokens            floor = FLOPs / matmul rate
    prefill 8 x 512 tokens, packed
Decode is timed two ways: the GPU's time of a graph replay (CUDA events), and the
host's wall time of `ModelRunner.decode` + a synchronize, batch unchanged between
steps (what a scheduler sees). The baseline's decode step is
(t(generate 1 + N tokens) - t(generate 1 token)) / N.

Whether the host's work shows in a decode step: 40 steps with each step's tokens fed
back on the device, queued all at once (the GPU's time a step), each read before the
next is queued, and queued one ahead of the read (the decode loop on the GPU); then
the decode worker's own steady-state step period, reading each step and one ahead.

The Triton GEMV (engine/kernels/gemv.py) is checked first against F.linear on the
five decode shapes; if it fails, the run goes on with `linear.GEMV_MAX_ROWS = 0`
(F.linear everywhere) and says so. Decode B=1, 8, 64 are timed with the GEMV on
and off side by side, and each GEMM shape at one row is timed for every
`gemv.SWEEP_CONFIGS` entry against F.linear (from CUDA graphs, each call on
another layer's weights so that L2 holds none of them).

Other shapes than Llama-3-8B run the GEMV check (dense projections), the engine rows
and the baseline only.
"""
from __future__ import annotations

import argparse
import datetime
import time
import traceback
from pathlib import Path

import torch

from engine_report import write_report
from engine_steps import profile_steps, sweep_kernels, time_baseline, time_engine, time_step_loops
from engine_timing import LOG, ROOT, BlockSource, Counts, build_models, measure_ceilings, say
from gemv_study import check_gemv, compare_gemv, sweep_gemv
from shapes import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=f"engine_speed_{datetime.date.today().isoformat()}")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(MODELS),
                        help="the model shape (benchmarks/shapes.py MODELS); others than llama3-8b run fewer sections")
    parser.add_argument("--sweep", action="store_true", help="also sweep the attention kernels' tuning knobs")
    parser.add_argument("--profile", action="store_true", help="also print GPU time per kernel of eager steps")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    results = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "rows": {}, "baseline": {}, "errors": [], "variants": {}, "host_enqueue_ms": {}, "step_loops": {},
        "shape": args.shape,
    }
    results["copy_bps"], results["matmul_flops"] = measure_ceilings()
    say(f"ceilings: copy {results['copy_bps'] / 1e12:.2f} TB/s, matmul {results['matmul_flops'] / 1e12:.0f} TFLOP/s")
    num_blocks = (64 + 8) * 65 + 1200  # the B=64 and B=8 batches, the B=1 batch, prompts
    hf, runner = build_models(num_blocks, args.shape)
    say(f"models built; GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    counts = Counts(runner.spec)
    blocks = BlockSource(num_blocks)
    sections = [("gemv check", lambda: check_gemv(runner, results)),
                ("engine", lambda: time_engine(runner, blocks, counts, results)),
                ("step loops", lambda: time_step_loops(runner, blocks, results)),
                ("gemv on/off", lambda: compare_gemv(runner, blocks, results)),
                ("gemv sweep", lambda: sweep_gemv(runner, results))]
    if args.profile:
        sections.append(("profile", lambda: profile_steps(runner, blocks, results)))
    if args.sweep:
        sections.append(("sweep", lambda: sweep_kernels(runner, blocks, results, results["copy_bps"])))
    if args.shape != "llama3-8b":  # the sections that read the shape; no fp32 copy of a 30B model
        sections = [s for s in sections if s[0] in ("gemv check", "engine")]
    if not args.no_baseline:
        sections.append(("baseline", lambda: time_baseline(hf, counts, results)))
    for name, section in sections:
        t0 = time.perf_counter()
        try:
            section()
        except Exception:
            results["errors"].append(f"{name}: {traceback.format_exc()}")
            say(f"SECTION {name} FAILED:\n{traceback.format_exc()}")
        say(f"[{name}: {time.perf_counter() - t0:.1f} s]")
        text = write_report(results, args.out, args.name)  # after each section: a partial table survives
    (args.out / f"{args.name}.log").write_text("\n".join(LOG) + "\n")
    print(text)



if __name__ == "__main__":
    main()
