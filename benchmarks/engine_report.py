"""engine_speed's report: the table of rows against their floors (DIR/NAME.md), the raw results
(DIR/NAME.json) and a roofline plot (DIR/NAME.png)."""
from __future__ import annotations

import json
import traceback
from pathlib import Path

from engine_timing import say
from gemv_study import gemv_sweep_lines


def write_report(results: dict, out_dir: Path, name: str) -> str:
    copy_bps, matmul = results["copy_bps"], results["matmul_flops"]
    lines = [
        f"# Engine speed: {results['device']}, {results['date']}",
        "",
        f"{results.get('shape', 'llama3-8b')} shape, bf16, random weights; torch {results['torch']}, triton {results['triton']}, "
        f"transformers {results['transformers']}.",
        f"Ceilings measured in this run: device copy {copy_bps / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul 8192³ {matmul / 1e12:.0f} TFLOP/s.",
        "Decode floor = bytes (weights read once — of an MoE the experts the step's tokens were routed to — "
        "+ KV read + KV written) / copy rate; "
        "prefill floor = FLOPs (linear + causal attention + sampled rows' lm_head) / matmul rate.",
        "",
        "| row | engine ms | floor ms | ratio to floor | MBU / MFU | host wall ms (decode()) | eager ms | "
        "transformers generate() ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results["rows"].items():
        if r["kind"] == "decode":
            floor = r["bytes"] / copy_bps * 1e3
            util = f"MBU {floor / r['ms']:.2f}"
        else:
            floor = r["flops"] / matmul * 1e3
            util = f"MFU {floor / r['ms']:.2f}"
        base = results["baseline"].get(row)
        base_text = "" if base is None else f"{base:.1f}"
        speedup = "" if base is None else f"{base / r['ms']:.1f}x"
        lines.append(
            f"| {row} | {r['ms']:.2f} | {floor:.2f} | {r['ms'] / floor:.2f} | {util} | "
            f"{r.get('wall_ms', float('nan')):.2f} | {r.get('eager_ms', float('nan')):.2f} | "
            f"{base_text} | {speedup} |")
    if results.get("variants"):
        lines += ["", "| variant | graph replay ms | decode() wall ms | wall - replay ms | host enqueue ms "
                  "(replay() alone) |", "|---|---|---|---|---|"]
        for variant, v in results["variants"].items():
            if "error" in v:
                lines.append(f"| {variant} | {v['error']} | | | |")
            else:
                lines.append(f"| {variant} | {v['ms']:.3f} | {v['wall_ms']:.3f} | {v['wall_ms'] - v['ms']:.3f} | "
                             f"{v['enqueue_ms']:.3f} ({v['replay_enqueue_ms']:.3f}) |")
    if "gemv_check" in results:
        lines += ["", "Triton GEMV vs F.linear fp32 (rel. err): " + json.dumps(results["gemv_check"], default=str)]
    lines += gemv_sweep_lines(results.get("gemv_sweep", {}))
    if results.get("note"):
        lines += ["", results["note"]]
    lines += step_loop_lines(results.get("step_loops", {}))
    if results.get("host_enqueue_ms"):
        lines += ["", "Host time to enqueue one decode() (no sync), ms: " + json.dumps(
            {k: round(v, 3) for k, v in results["host_enqueue_ms"].items()})]
    lines += ["", f"Decode graphs: {results.get('graph_capture_s', float('nan')):.2f} s to capture all sizes."]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        plot_roofline(results, out_dir / f"{name}.png")
    except Exception:
        say("roofline plot failed:", traceback.format_exc())
    return text


def step_loop_lines(loops: dict) -> list[str]:
    """The host-overhead table: each way of running steps against the GPU's time a step."""
    if not loops:
        return []
    lines = ["", "Decode step loops, 1k context, greedy, tokens fed back on the device: ms a step "
             "(+ ms over the GPU's time a step, all steps queued ahead); worker rows: the decode worker's "
             "step period in its steady state (median gap between a sequence's tokens; KV centred on 1k)", "",
             "| batch | GPU's time (queued ahead) | read each step | one step ahead | worker, read each | "
             "worker, one ahead |", "|---|---|---|---|---|---|"]
    for batch, row in loops.items():
        base = row["queued"]
        cell = lambda ms: f"{ms:.3f} ({ms - base:+.3f})"
        lines.append(f"| {batch} | {base:.3f} | {cell(row['read each'])} | {cell(row['one ahead'])} | "
                     f"{cell(row['worker, read each']['ms'])} | {cell(row['worker, one ahead']['ms'])} |")
    return lines


def plot_roofline(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy_bps, matmul = results["copy_bps"], results["matmul_flops"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = [10 ** (x / 20) for x in range(0, 100)]  # 1 .. 1e5 FLOP/byte
    ax.plot(ai, [min(matmul, a * copy_bps) / 1e12 for a in ai], "k-", lw=1.5, label="roof (measured)")
    ax.axhline(matmul / 1e12, color="gray", ls=":", lw=1)
    ax.text(1.2, matmul / 1e12 * 1.08, f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s", fontsize=8)
    ax.text(1.2, copy_bps * 1.2 / 1e12 * 1.4, f"copy {copy_bps / 1e12:.2f} TB/s", fontsize=8, rotation=28)
    for row, r in results["rows"].items():
        x = r["flops"] / r["bytes"]
        color = "tab:blue" if r["kind"] == "decode" else "tab:red"
        ax.plot(x, r["flops"] / (r["ms"] * 1e-3) / 1e12, "o", color=color)
        ax.annotate(f"engine {row}", (x, r["flops"] / (r["ms"] * 1e-3) / 1e12), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
        base = results["baseline"].get(row)
        if base:
            ax.plot(x, r["flops"] / (base * 1e-3) / 1e12, "x", color=color)
            ax.annotate("generate()", (x, r["flops"] / (base * 1e-3) / 1e12), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of device memory)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Engine roofline, {results.get('shape', 'llama3-8b')} shape bf16, {results['device']}, {results['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

