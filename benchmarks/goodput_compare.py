"""Disaggregated against colocated, from `pdserve bench` JSONs: goodput ratio per workload and SLO.

    python benchmarks/goodput_compare.py BENCH_DIR OUT_STEM

Reads BENCH_DIR/{1p1d,colocated2}-{workload}-bench.json (benchmarks/gpu2_goodput.py
writes them) and writes OUT_STEM.md (per workload and SLO: goodput at each offered
rate for both deployments and their ratio, p90 TTFT and TPOT) and OUT_STEM.png
(goodput against offered rate). Goodput is re-judged from the per-request
records, so one sweep answers several SLOs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pdserve.cluster.bench.result import BenchResult  # noqa: E402
from pdserve.cluster.bench.stats import Slo  # noqa: E402

DEPLOYMENTS = {"1p1d": "1 prefill + 1 decode (disaggregated)", "colocated2": "colocated × 2"}
SLOS = (Slo(1.0, 0.050), Slo(0.5, 0.025), Slo(0.5, 0.015))  # (TTFT s, TPOT s), p-any: per request


def load(directory: Path) -> dict[str, dict[str, BenchResult]]:
    """{workload: {deployment: result}} for the workloads both deployments ran."""
    found: dict[str, dict[str, BenchResult]] = {}
    for name in DEPLOYMENTS:
        for path in sorted(directory.glob(f"{name}-*-bench.json")):
            workload = path.name[len(name) + 1 : -len("-bench.json")]
            found.setdefault(workload, {})[name] = BenchResult.load(path)
    return {w: r for w, r in found.items() if len(r) == len(DEPLOYMENTS)}


def _ms(latency) -> str:
    return "-" if latency.p90 is None else f"{1e3 * latency.p90:.0f}"


def workload_table(workload: str, results: dict[str, BenchResult], slo: Slo) -> list[str]:
    a, b = results["1p1d"], results["colocated2"]
    w = a.workload
    lines = [f"### {workload}: prompts {w['prompt_tokens']}, outputs {w['output_tokens']} tokens; "
             f"SLO TTFT ≤ {1e3 * slo.ttft_s:.0f} ms and TPOT ≤ {1e3 * slo.tpot_s:.0f} ms per request",
             "", "| offered req/s | 1P+1D goodput | colocated×2 goodput | ratio | 1P+1D TTFT p90 / TPOT p90 ms | "
             "colocated TTFT p90 / TPOT p90 ms |", "|---|---|---|---|---|---|"]
    best = [0.0, 0.0]
    for run_a, run_b in zip(a.runs, b.runs):
        sa, sb = run_a.summary(slo), run_b.summary(slo)
        best = [max(best[0], sa.goodput_rps), max(best[1], sb.goodput_rps)]
        ratio = f"{sa.goodput_rps / sb.goodput_rps:.2f}" if sb.goodput_rps else "inf" if sa.goodput_rps else "-"
        lines.append(f"| {run_a.rate:g} | {sa.goodput_rps:.2f} | {sb.goodput_rps:.2f} | {ratio} | "
                     f"{_ms(sa.ttft)} / {_ms(sa.tpot)} | {_ms(sb.ttft)} / {_ms(sb.tpot)} |")
    ratio = f"{best[0] / best[1]:.2f}" if best[1] else "inf" if best[0] else "-"
    lines += ["", f"Highest goodput: 1P+1D {best[0]:.2f} req/s, colocated×2 {best[1]:.2f} req/s: "
              f"ratio **{ratio}**.", ""]
    return lines


def plot(found: dict[str, dict[str, BenchResult]], slo: Slo, path: Path) -> None:
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.2), squeeze=False)
    for ax, (workload, results) in zip(axes[0], sorted(found.items())):
        for name, label in DEPLOYMENTS.items():
            runs = results[name].runs
            ax.plot([r.rate for r in runs], [r.summary(slo).goodput_rps for r in runs], marker="o", label=label)
        w = results["1p1d"].workload
        ax.set(title=f"{workload}: prompts {w['prompt_tokens']}, outputs {w['output_tokens']}",
               xlabel="offered requests/s", ylabel="goodput (req/s within both SLOs)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Two GPUs, same model: SLO TTFT ≤ {1e3 * slo.ttft_s:.0f} ms, TPOT ≤ {1e3 * slo.tpot_s:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    directory, stem = Path(sys.argv[1]), Path(sys.argv[2])
    found = load(directory)
    if not found:
        raise SystemExit(f"no workload in {directory} has bench JSONs from both {' and '.join(DEPLOYMENTS)}")
    lines = [f"# Disaggregated vs colocated goodput ({', '.join(sorted(found))})", ""]
    for slo in SLOS:
        for workload in sorted(found):
            lines += workload_table(workload, found[workload], slo)
    stem.with_suffix(".md").write_text("\n".join(lines))
    for i, slo in enumerate(SLOS):
        plot(found, slo, stem.with_name(f"{stem.name}-slo{i}.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
