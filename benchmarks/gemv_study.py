"""The Triton GEMV (engine/kernels/gemv.py) in engine_speed's run: checked against F.linear on the
model's decode shapes first (off for the run if wrong), decode with it on and off side by side, and
each decode GEMM at one and eight rows over `gemv.SWEEP_CONFIGS` (from CUDA graphs, each call on
another layer's weights so that L2 holds none of them)."""
from __future__ import annotations

import json

import torch

from engine_timing import BlockSource, calls_ms, decode_inputs, rel_err, say, time_decode
from pdserve.engine import linear as engine_linear
from pdserve.engine.kernels import gemv as gemv_kernel


def gemm_shapes(runner) -> dict[str, list[torch.Tensor]]:
    """Each dense decode GEMM of the model: its weight in every layer ([N, K] each); MoE experts are not GEMVs."""
    layers = runner.model.weights.layers
    dense = [l.mlp for l in layers if hasattr(l.mlp, "gate_up")]
    shapes = {"qkv": [l.qkv.weight for l in layers], "o": [l.o.weight for l in layers],
              "gate_up": [m.gate_up.weight for m in dense], "down": [m.down.weight for m in dense],
              "lm_head": [runner.model.weights.lm_head.weight]}
    return {name: weights for name, weights in shapes.items() if weights}


def check_gemv(runner, results: dict) -> None:
    """The Triton GEMV against F.linear (fp32) on each decode shape at 1 and 8 rows; off for the run if wrong."""
    from torch.nn.functional import linear

    out = results["gemv_check"] = {}
    for name, weights in gemm_shapes(runner).items():
        w = weights[0]
        for rows in (1, 8):
            x = torch.randn(rows, w.shape[1], dtype=w.dtype, device="cuda")
            try:
                err = rel_err(gemv_kernel.gemv_triton(x, w), linear(x.float(), w.float()))
                out[f"{name} M={rows}"] = err
            except Exception as e:
                out[f"{name} M={rows}"] = f"{type(e).__name__}: {e}"[:300]
    failed = {k: v for k, v in out.items() if not isinstance(v, float) or not v < 2e-2}
    if failed:
        engine_linear.set_gemv_max_rows(0)
    say(f"gemv check (rel. err vs F.linear fp32): {json.dumps(out)}"
        + (f" -> FAILED {sorted(failed)}: the run uses F.linear (GEMV_MAX_ROWS=0)" if failed else ""))


def compare_gemv(runner, blocks: BlockSource, results: dict) -> None:
    """Decode B=1, 8, 64 with the Triton GEMV on (GEMV_MAX_ROWS as shipped) and off (0), side by side.
    B=64 is past the bound either way: its two rows measure the noise."""
    graphs, vocab = runner.decode_graphs, runner.spec.vocab_size
    shipped = engine_linear.GEMV_MAX_ROWS  # 0 if check_gemv turned it off
    for batch in (1, 8, 64):
        inputs = decode_inputs(blocks, batch, 1024, vocab)
        for label, max_rows in (("on", shipped), ("off", 0)):
            name = f"decode B={batch}, ctx 1024, GEMV {label} (GEMV_MAX_ROWS={max_rows})"
            if label == "on" and not shipped:
                results["variants"][name] = dict(error="skipped: the GEMV is off for this run")
                continue
            engine_linear.set_gemv_max_rows(max_rows)
            graphs._graphs.pop(graphs.size_for(batch), None)  # recaptured with this setting
            try:
                timed = time_decode(runner, inputs)
            except Exception as e:  # the kernel failing on this GPU must not end the run
                results["variants"][name] = dict(error=f"{type(e).__name__}: {e}"[:300])
                say(f"variant {name}: FAILED {results['variants'][name]['error']}")
                shipped = 0  # F.linear from here on
                continue
            results["variants"][name] = timed
            say(f"variant {name}: graph replay {timed['ms']:.3f} ms, decode() wall {timed['wall_ms']:.3f} ms, "
                f"host enqueue {timed['enqueue_ms']:.3f} ms (replay() alone {timed['replay_enqueue_ms']:.3f} ms)")
    engine_linear.set_gemv_max_rows(shipped)
    for size in [s for s in graphs.sizes if s <= 8 or s == 64]:
        graphs._graphs.pop(size, None)  # captured again, with the shipped setting, when next needed


def sweep_gemv(runner, results: dict) -> None:
    """Each decode GEMM at one row: F.linear and every gemv.SWEEP_CONFIGS entry; at eight rows F.linear and two
    configs. Each graph calls every layer's weight in turn (lm_head: its one 1 GB weight 4 times), so no weight
    is in L2 when read, as in a decode step."""
    from torch.nn.functional import linear

    out = results["gemv_sweep"] = {}
    eight_rows = {"dot (default at M>1)": gemv_kernel.default_config(8, 4096),
                  "fma (16,512,4,3)": gemv_kernel.GemvConfig(16, 512, 4, 3)}
    for name, weights in gemm_shapes(runner).items():
        weights = weights if len(weights) > 1 else weights * 4
        n, k = weights[0].shape
        row = out[name] = {"shape": [n, k], "default": str(gemv_kernel.default_config(1, n)), "M=1": {}, "M=8": {}}
        x1 = torch.randn(1, k, dtype=weights[0].dtype, device="cuda")
        x8 = torch.randn(8, k, dtype=weights[0].dtype, device="cuda")
        candidates = [("M=1", "F.linear", x1, linear)]
        candidates += [("M=1", str(c), x1, lambda x, w, c=c: gemv_kernel.gemv_triton(x, w, config=c))
                       for c in gemv_kernel.SWEEP_CONFIGS]
        candidates += [("M=8", "F.linear", x8, linear)]
        candidates += [("M=8", label, x8, lambda x, w, c=c: gemv_kernel.gemv_triton(x, w, config=c))
                       for label, c in eight_rows.items()]
        for rows, label, x, fn in candidates:
            try:
                ms = calls_ms([lambda w=w: fn(x, w) for w in weights])
                row[rows][label] = dict(us=ms * 1e3, tbps=n * k * 2 / (ms * 1e-3) / 1e12)
            except Exception as e:  # a config that does not compile or run here: reported, skipped
                row[rows][label] = dict(error=f"{type(e).__name__}: {e}"[:200])
        timed = {label: v for label, v in row["M=1"].items() if "us" in v and label != "F.linear"}
        row["best"] = min(timed, key=lambda label: timed[label]["us"]) if timed else None
        say(f"gemv sweep {name} {n}x{k} M=1: " + ", ".join(
            f"{label} {v['us']:.1f} us {v['tbps']:.2f} TB/s" if "us" in v else f"{label} {v['error']}"
            for label, v in row["M=1"].items()) + f"; best {row['best']}")
        say(f"gemv sweep {name} {n}x{k} M=8: " + ", ".join(
            f"{label} {v['us']:.1f} us" if "us" in v else f"{label} {v['error']}" for label, v in row["M=8"].items()))


def gemv_sweep_lines(sweep: dict) -> list[str]:
    """The per-shape GEMV table: F.linear, the shipped config and the best config at M=1; M=8 alongside."""
    if not sweep:
        return []
    eight_labels = list(next(iter(sweep.values()))["M=8"])
    lines = ["", "Decode GEMMs (from CUDA graphs, no weight in L2): us (TB/s) at M=1; us at M=8", "",
             "| GEMM | N x K | F.linear | shipped config | shipped | best config | best | M=8: "
             + " / ".join(eight_labels) + " |",
             "|---|---|---|---|---|---|---|---|"]
    cell = lambda v: f"{v['us']:.1f} ({v['tbps']:.2f})" if v and "us" in v else (v or {}).get("error", "-")[:60]
    for name, row in sweep.items():
        best = row.get("best")
        eight = " / ".join(f"{row['M=8'][k]['us']:.1f}" if "us" in row["M=8"].get(k, {}) else "err"
                           for k in eight_labels)
        lines.append(f"| {name} | {row['shape'][0]} x {row['shape'][1]} | {cell(row['M=1'].get('F.linear'))} | "
                     f"{row['default']} | {cell(row['M=1'].get(row['default']))} | {best} | "
                     f"{cell(row['M=1'].get(best))} | {eight} |")
    return lines

