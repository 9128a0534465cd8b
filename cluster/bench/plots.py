"""The PNGs: the bench's latency CDFs and goodput against rate; the diagnosis at a glance."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .diagnosis import Diagnosis  # noqa: E402
from .result import BenchResult, Run  # noqa: E402

def _label(run: Run) -> str:
    return f"{run.rate:g} req/s" if run.rate is not None else f"concurrency {run.concurrency or 'all'}"


def plot_latency_cdfs(result: BenchResult, path: Path) -> Path:
    """TTFT, TPOT, ITL and E2E CDFs in ms, with the SLOs drawn where they apply."""
    metrics = {
        "TTFT": (lambda r: [q.ttft_s for q in r.requests if q.is_ok], result.slo.ttft_s),
        "TPOT": (lambda r: [q.tpot_s for q in r.requests if q.tpot_s is not None], result.slo.tpot_s),
        "ITL": (lambda r: [g for q in r.requests if q.is_ok for g in q.itl_s], None),
        "E2E": (lambda r: [q.e2e_s for q in r.requests if q.is_ok], None),
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (name, (values_of, slo)) in zip(axes, metrics.items()):
        for run in result.runs:
            values = sorted(1e3 * v for v in values_of(run))
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=_label(run))
        if slo is not None:
            ax.axvline(1e3 * slo, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput(result: BenchResult, path: Path) -> Path:
    """Throughput and goodput (req/s) against the offered rate, SLO attainment on a second axis."""
    runs = sorted((r for r in result.runs if r.rate is not None), key=lambda r: r.rate)
    summaries = [r.summary(result.slo) for r in runs]
    rates = [s.rate for s in summaries]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(rates, rates, color="grey", linestyle=":", label="offered")
    ax.plot(rates, [s.throughput_rps for s in summaries], marker="o", label="throughput")
    ax.plot(rates, [s.goodput_rps for s in summaries], marker="s", label="goodput (both SLOs met)")
    ax.set(xlabel="offered rate (req/s)", ylabel="req/s",
           title=f"Goodput, SLO TTFT {1e3 * result.slo.ttft_s:g} ms, TPOT {1e3 * result.slo.tpot_s:g} ms")
    ax.grid(alpha=0.3)
    attainment = ax.twinx()
    attainment.plot(rates, [100 * s.slo_attainment for s in summaries], color="green", alpha=0.4,
                    linestyle="--", label="SLO attainment")
    attainment.set(ylabel="SLO attainment (%)", ylim=(0, 105))
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = attainment.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bench(result: BenchResult, stem: Path) -> list[Path]:
    """`<stem>-latency.png`, and `<stem>-goodput.png` when the runs had offered rates."""
    paths = [plot_latency_cdfs(result, stem.with_name(stem.name + "-latency.png"))]
    if any(run.rate is not None for run in result.runs):
        paths.append(plot_goodput(result, stem.with_name(stem.name + "-goodput.png")))
    return paths


def plot_diagnosis(d: Diagnosis, path: Path) -> Path:
    """Where TTFT goes per load, each phase against its SLO per load, and goodput by P:D split."""
    fig, (phases, ratios, splits) = plt.subplots(1, 3, figsize=(18, 4.8))
    loads = [p.throughput_rps for p in d.points]
    labels = [f"{x:.2f}" for x in loads]
    bottom = [0.0] * len(d.points)
    for name, values in (("queue", [p.queue_s for p in d.points]), ("prefill", [p.prefill_s for p in d.points]),
                         ("KV handoff", [p.kv_transfer_s for p in d.points]),
                         ("router + reservation", [p.router_s for p in d.points]),
                         ("HTTP front end", [p.frontend_s for p in d.points])):
        ms = [1e3 * v for v in values]
        phases.bar(labels, ms, bottom=bottom, label=name)
        bottom = [b + m for b, m in zip(bottom, ms)]
    phases.plot(labels, [1e3 * p.ttft_p90_s for p in d.points], "kD", label="client TTFT p90")
    phases.axhline(1e3 * d.slo.ttft_s, color="red", linestyle="--", linewidth=1, label="TTFT SLO")
    phases.set(title="TTFT by phase (server means)", xlabel="throughput (req/s)", ylabel="ms")
    phases.legend(fontsize=8)

    ratios.plot(loads, [p.prefill_ratio for p in d.points], marker="o", label="prefill: queue+prefill+KV p90 / TTFT SLO")
    ratios.plot(loads, [p.decode_ratio for p in d.points], marker="s", label="decode: TPOT p90 / TPOT SLO")
    ratios.axhline(1.0, color="red", linestyle="--", linewidth=1)
    verdict = f"host ({d.host_part})" if d.bottleneck == "host" else d.bottleneck
    ratios.set(title=f"Bottleneck: {verdict} ({d.deployment})", xlabel="throughput (req/s)",
               ylabel="latency / SLO", yscale="log")
    ratios.grid(alpha=0.3)
    ratios.legend(fontsize=8)

    row = sorted(d.splits, key=lambda s: s.num_prefill / (s.num_prefill + s.num_decode))
    row = [s for s in row if s.num_prefill + s.num_decode >= d.max_replicas - 1 or s in (d.best, d.baseline)]
    colours = ["tab:green" if s == d.best else "tab:orange" if s == d.baseline else "tab:grey" for s in row]
    splits.bar([f"{s.num_prefill}:{s.num_decode}" for s in row], [s.per_gpu_rps for s in row], color=colours)
    gain = "" if d.gain <= 1e-6 or d.gain == float("inf") else f", +{100 * d.gain:.0f}% over the current ratio (orange)"
    splits.set(title=f"Predicted goodput per GPU\nbest {d.best.num_prefill}:{d.best.num_decode} (green){gain}",
               xlabel="prefill:decode replicas", ylabel="req/s per GPU holding both SLOs")
    splits.title.set_fontsize(10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
