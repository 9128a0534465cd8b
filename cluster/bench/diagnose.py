"""`pdserve diagnose`: which phase limits a deployment, at which load, and the P:D ratio to run instead.

From a bench result (read, or a short sweep run now):
1. per offered load, the measured p90 TTFT and TPOT against their SLOs, TTFT
   split into queue / prefill / KV handoff by the server's timings; the phase
   further past (or closer to) its SLO is that load's bottleneck, and the
   deployment's bottleneck is the phase that breaks its SLO at the lowest load;
2. the replicas' own reports (prefill tokens/s, decode step time against batch
   size) become the cost model's profiles (`cluster/cost_model.py`, the one the
   autoscaler uses); it predicts, for every prefill:decode split up to
   `MAX_REPLICAS`, the highest rate that holds both SLOs, and the split with the
   most goodput per replica is the recommendation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from .. import cost_model as cm
from .diagnosis import MAX_REPLICAS, Diagnosis, LoadPoint, Split
from .result import BenchResult, Run
from .run import BenchConfig, main_config, run_bench
from .stats import RunSummary, Slo, percentile

PROBE_CONCURRENCY = 4
SWEEP_FRACTIONS = (0.4, 0.8, 1.2)  # of the probe's throughput


class NothingToDiagnose(ValueError):
    """A bench result with no successful request: no phase can be timed."""


def diagnose(result: BenchResult) -> Diagnosis:
    """Explain a bench result; pure, so tests can feed it recorded runs."""
    status = result.target.get("status") or {}
    pools = status.get("pools", {})
    colocated = bool(status.get("colocated"))
    num_prefill = 0 if colocated else max(len(pools.get("prefill", {})), 1)
    num_decode = max(len(pools.get("decode", {})), 1)
    slo, profiles = result.slo, fit_profiles(result)
    ok = [q for run in result.runs for q in run.requests if q.is_ok]
    if not ok:
        errors = [q.error for run in result.runs for q in run.requests if q.error]
        raise NothingToDiagnose("no request of the bench succeeded" + (f"; the first failed with: {errors[0]}"
                                                                         if errors else ""))
    summaries = [run.summary(slo) for run in result.runs]
    workload = cm.Workload(max(s.throughput_rps for s in summaries), statistics.fmean(q.prompt_tokens for q in ok),
                           statistics.fmean(q.output_tokens for q in ok), prefix_hit_rate=prefix_hit_rate(result))
    points = sorted((_point(run, summary, slo, profiles, max(num_prefill, 1), workload)
                     for run, summary in zip(result.runs, summaries)), key=lambda p: p.throughput_rps)
    broken = next((p for p in points if max(p.prefill_ratio, p.decode_ratio) > 1), None)
    bottleneck = (broken or max(points, key=lambda p: max(p.prefill_ratio, p.decode_ratio))).bottleneck
    at_current = cm.predict(workload, max(num_prefill, 1), num_decode, profiles, slo)
    splits = [Split(p, d, max_goodput(workload, p, d, profiles, slo))
              for p in range(1, MAX_REPLICAS) for d in range(1, MAX_REPLICAS - p + 1)]
    best = max(splits, key=lambda s: (round(s.per_replica_rps, 9), -(s.num_prefill + s.num_decode)))
    current_sizes = (1, 1) if colocated else (num_prefill, num_decode)
    current = Split(*current_sizes, max_goodput(workload, *current_sizes, profiles, slo))
    baseline = _scaled(splits, current_sizes)
    name = f"colocated x{num_decode}" if colocated else f"{num_prefill} prefill + {num_decode} decode"
    return Diagnosis(name, colocated, num_prefill, num_decode, slo, workload, profiles, points, bottleneck,
                     broken.throughput_rps if broken else None, at_current.bottleneck, current, baseline, best, splits,
                     hardware_lines(result, profiles))


def _scaled(splits: list[Split], sizes: tuple[int, int]) -> Split:
    """The current ratio at the most replicas searched: `sizes` times k, with k·(p + d) <= MAX_REPLICAS."""
    k = max(MAX_REPLICAS // sum(sizes), 1)
    return next(s for s in splits if (s.num_prefill, s.num_decode) == (k * sizes[0], k * sizes[1]))


def fit_profiles(result: BenchResult) -> cm.Profiles:
    """The cost model's profiles from the replicas' reports, or the requests' timings where none came."""
    reports = _replica_reports(result)
    rates = [s["tokens_per_s"] for pool, s in reports if pool == "prefill" and s.get("tokens_per_s", 0) > 0]
    timed = [(q.prompt_tokens, q.server) for run in result.runs for q in run.requests if q.is_ok and q.server]
    if not rates:  # colocated: the prompt's own forward time on the replica that decodes it
        rates = [n / t["prefill_s"] for n, t in timed if t.get("prefill_s", 0) > 0]
    handoff = statistics.median([t.get("kv_transfer_s", 0.0) for _, t in timed]) if timed else 0.0
    steps = [cm.StepSample(s["batch_size"], s["step_time_s"]) for pool, s in reports
             if pool == "decode" and s.get("batch_size", 0) > 0 and s.get("step_time_s", 0) > 0]
    if steps:
        decode = cm.DecodeProfile.fit(steps)
    else:  # no reports: the requests' own time per output token, as a constant step
        decode = cm.DecodeProfile(statistics.median([t["tpot_s"] for _, t in timed if t.get("tpot_s", 0) > 0] or [0.0]))
    return cm.Profiles(cm.PrefillProfile(statistics.median(rates) if rates else 0.0, handoff), decode)


def prefix_hit_rate(result: BenchResult) -> float:
    """The prefill replicas' prefix-cache hit rate at the last report (each counts since its start)."""
    last = [sample for run in result.runs for sample in run.pools if sample["pools"].get("prefill")]
    rates = [r.get("prefix_hit_rate", 0.0) for r in last[-1]["pools"]["prefill"].values()] if last else []
    return statistics.fmean(rates) if rates else 0.0


def _replica_reports(result: BenchResult) -> list[tuple[str, dict[str, Any]]]:
    """(pool, one replica's stats) of every pool sample taken while the runs went."""
    return [(pool, stats) for run in result.runs for sample in run.pools
            for pool, replicas in sample["pools"].items() for stats in replicas.values()]


def max_goodput(workload: cm.Workload, num_prefill: int, num_decode: int, profiles: cm.Profiles,
                slo: cm.Slo) -> float:
    """The highest arrival rate at which the cost model predicts both SLOs hold (0: not even one request)."""
    def holds(rate: float) -> bool:
        return cm.predict(dataclasses.replace(workload, arrival_rate=rate), num_prefill, num_decode,
                          profiles).holds(slo)

    low, high = 0.0, 1e-3
    if not holds(high):
        return 0.0
    while holds(high) and high < 1e6:
        low, high = high, high * 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


def _point(run: Run, summary: RunSummary, slo: Slo, profiles: cm.Profiles, num_prefill: int,
           workload: cm.Workload) -> LoadPoint:
    """One run's load point; `workload` (the whole bench's) gives the prefix cache's hit rate."""
    ok = [q for q in run.requests if q.is_ok]
    timed = [q for q in ok if q.server]
    phase = sorted(q.server["queue_s"] + q.server["prefill_s"] + q.server["kv_transfer_s"] for q in timed)
    prefill_phase = percentile(phase, 90) if phase else (summary.ttft.p90 or 0.0)  # no server timings: all of TTFT
    mean = {k: statistics.fmean(q.server[k] for q in timed) if timed else 0.0
            for k in ("queue_s", "prefill_s", "kv_transfer_s", "ttft_s")}
    client_ttft = statistics.fmean(q.ttft_s for q in timed) if timed else 0.0
    run_prompt = statistics.fmean(q.prompt_tokens for q in ok) if ok else 0.0
    mean_computed = dataclasses.replace(workload, prompt_tokens=run_prompt).computed_prompt_tokens
    capacity = num_prefill * profiles.prefill.tokens_per_s
    batches = [r["batch_size"] for sample in run.pools for r in sample["pools"].get("decode", {}).values()
               if r.get("num_running", 0) > 0]
    prefill_ratio, decode_ratio = prefill_phase / slo.ttft_s, (summary.tpot.p90 or 0.0) / slo.tpot_s
    return LoadPoint(
        offered_rps=summary.rate, throughput_rps=summary.throughput_rps, goodput_rps=summary.goodput_rps,
        ttft_p90_s=summary.ttft.p90 or 0.0, prefill_phase_p90_s=prefill_phase, tpot_p90_s=summary.tpot.p90 or 0.0,
        queue_s=mean["queue_s"], prefill_s=mean["prefill_s"], kv_transfer_s=mean["kv_transfer_s"],
        router_s=max(mean["ttft_s"] - mean["queue_s"] - mean["prefill_s"] - mean["kv_transfer_s"], 0.0),
        frontend_s=max(client_ttft - mean["ttft_s"], 0.0) if timed else 0.0,
        prefill_utilisation=summary.throughput_rps * mean_computed / capacity if capacity else 0.0,
        decode_batch=statistics.fmean(batches) if batches else 0.0,
        prefill_ratio=prefill_ratio, decode_ratio=decode_ratio,
        bottleneck="prefill" if prefill_ratio >= decode_ratio else "decode",
    )


def hardware_lines(result: BenchResult, profiles: cm.Profiles) -> list[str]:
    """How close each phase runs to its hardware limit, as far as the reports tell."""
    reports = [stats for _, stats in _replica_reports(result)]
    mfu = [r["mfu"] for r in reports if r.get("mfu")]
    mbu = [r["mbu"] for r in reports if r.get("mbu")]
    timed = [q.server for run in result.runs for q in run.requests if q.is_ok and q.server and q.server.get("kv_bytes")]
    lines = []
    if mfu or mbu:
        lines.append(f"prefill MFU {_percent(max(mfu, default=None))}, decode MBU {_percent(max(mbu, default=None))} "
                     "(of the GPU's measured matmul and copy rates)")
    else:
        lines.append("MFU and MBU: not reported by these replicas. On the CPU they are not meaningful "
                     "(no matmul or copy peak to hold them against); what is known:")
    d = profiles.decode
    lines.append(f"prefill {profiles.prefill.tokens_per_s:,.0f} prompt tokens/s per replica; decode step "
                 f"{1e3 * d.step_time(1):.1f} ms at batch 1, +{1e3 * d.per_seq_s:.2f} ms per running sequence")
    if timed:
        per_request = statistics.median(t["kv_bytes"] for t in timed)
        exposed = statistics.median(t["kv_transfer_s"] for t in timed)
        achieved = statistics.median(t["kv_bytes"] / max(t["prefill_s"] + t["kv_transfer_s"], 1e-9) for t in timed)
        lines.append(f"KV handoff: {per_request / 2**20:.2f} MiB per request, {1e3 * exposed:.1f} ms exposed after "
                     f"prefill (median); at least {achieved / 1e6:,.1f} MB/s achieved (the push overlaps prefill "
                     "layer by layer, so this is bounded by prefill compute, not by the link)")
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _rate(rps: float) -> str:
    return "unbounded" if math.isinf(rps) else f"{rps:.2f} req/s"


def report(d: Diagnosis) -> str:
    """The diagnosis in plain words, with its numbers."""
    slo, w = d.slo, d.workload
    cached = f" ({w.prefix_hit_rate:.0%} from the prefix cache)" if w.prefix_hit_rate else ""
    lines = [f"pdserve diagnose: {d.deployment}; workload {w.prompt_tokens:.0f} prompt{cached} → {w.output_tokens:.0f} "
             f"output tokens; SLO TTFT {1e3 * slo.ttft_s:g} ms, TPOT {1e3 * slo.tpot_s:g} ms (p90)", "",
             "   load → done  goodput | TTFT p90 = [queue prefill   KV | router front] ms | prefill p90 ×SLO "
             "| TPOT p90 ×SLO | prefill util  decode batch | bottleneck"]
    for p in d.points:
        offered = f"{p.offered_rps:g}" if p.offered_rps is not None else "closed"
        lines.append(
            f"{offered:>7} → {p.throughput_rps:4.2f}  {p.goodput_rps:7.2f} | {1e3 * p.ttft_p90_s:8.0f} = "
            f"[{1e3 * p.queue_s:5.0f} {1e3 * p.prefill_s:7.0f} {1e3 * p.kv_transfer_s:4.0f} | "
            f"{1e3 * p.router_s:6.0f} {1e3 * p.frontend_s:5.0f}]    | {p.prefill_ratio:10.2f}×     "
            f"| {1e3 * p.tpot_p90_s:5.0f} {p.decode_ratio:5.2f}× | {100 * p.prefill_utilisation:11.0f}%  "
            f"{p.decode_batch:12.1f} | {p.bottleneck}")
    lines += ["(TTFT parts are server means; 'prefill p90' is queue + prefill + KV at p90, the part of TTFT the "
              "prefill pool owns; router: routing + decode reservation + relay; front: HTTP proxy + network)", ""]
    top = max(d.points, key=lambda p: p.throughput_rps)
    if d.broken_at_rps is not None:
        worst = next(p for p in d.points if p.throughput_rps == d.broken_at_rps)
        lines.append(f"Bottleneck: {d.bottleneck.upper()}. From {d.broken_at_rps:.2f} req/s "
                     + _why(d.bottleneck, worst))
    else:
        lines.append(f"No phase broke its SLO up to {top.throughput_rps:.2f} req/s; the closest is "
                     f"{d.bottleneck.upper()} ({max(top.prefill_ratio, top.decode_ratio):.2f}× its SLO).")
    outside = top.router_s + top.frontend_s
    if top.ttft_p90_s > slo.ttft_s and outside > top.queue_s + top.prefill_s + top.kv_transfer_s:
        lines.append(f"Note: client TTFT ({1e3 * top.ttft_p90_s:.0f} ms p90) breaks its SLO mostly outside the "
                     f"phases: {1e3 * outside:.0f} ms of routing, reservation and HTTP on average (a busy host).")
    if d.colocated:
        lines.append("Colocated: prompts are prefilled between decode steps on the same replica, so TPOT here also "
                     "pays for prefill; the split below is what disaggregating this workload is predicted to give.")
    agree = "agrees" if d.model_bottleneck == d.bottleneck else "DISAGREES (trust the measurement)"
    lines.append(f"The cost model, at these sizes and {w.arrival_rate:.2f} req/s, {agree}: {d.model_bottleneck}.")
    lines += ["", "Hardware:"] + [f"  {line}" for line in d.hardware] + [""]
    lines.append(f"P:D ratio (cost model, goodput per replica, up to {MAX_REPLICAS} replicas): best "
                 f"{d.best.num_prefill}:{d.best.num_decode} → {_rate(d.best.max_goodput_rps)} holding both SLOs, "
                 f"{d.best.per_replica_rps:.2f} per replica")
    b, now = d.baseline, ("as 1 prefill + 1 decode" if d.colocated else "deployed")
    gain = "no gain" if d.gain <= 1e-6 else ("from nothing" if math.isinf(d.gain) else f"+{100 * d.gain:.0f}%")
    lines.append(f"  the current ratio scaled to {b.num_prefill}:{b.num_decode}: {_rate(b.max_goodput_rps)}, "
                 f"{b.per_replica_rps:.2f} per replica → expected gain {gain} in goodput per replica")
    lines.append(f"  {d.current.num_prefill}:{d.current.num_decode} {now}: predicted {_rate(d.current.max_goodput_rps)}"
                 f", measured best goodput {max(p.goodput_rps for p in d.points):.2f} req/s")
    if d.best.max_goodput_rps == 0:
        lines.append("  No split holds both SLOs even at a trickle: a single request is slower than the SLO "
                     "(faster replicas, shorter prompts or looser SLOs are needed, not another ratio).")
    return "\n".join(lines)


def _why(phase: str, p: LoadPoint) -> str:
    if phase == "prefill":
        waiting = p.queue_s / max(p.queue_s + p.prefill_s + p.kv_transfer_s, 1e-9)
        return (f"queue + prefill + KV reach {p.prefill_ratio:.1f}× the TTFT SLO at p90; {100 * waiting:.0f}% of "
                f"that is waiting for prefill, the prefill pool runs at {100 * p.prefill_utilisation:.0f}% of its "
                "measured rate.")
    return (f"TPOT reaches {p.decode_ratio:.1f}× its SLO at p90: decode runs batches of {p.decode_batch:.1f}, "
            "each step stretching every running request's TPOT.")


async def _sweep(config: BenchConfig) -> BenchResult:
    """A closed-loop probe for capacity, then Poisson runs around it."""
    probe = await run_bench(dataclasses.replace(config, rates=(None,), concurrency=PROBE_CONCURRENCY))
    capacity = probe.runs[0].summary(config.slo).throughput_rps
    rates = tuple(round(f * capacity, 3) for f in SWEEP_FRACTIONS)
    sweep = await run_bench(dataclasses.replace(config, rates=rates, warmup=0))
    sweep.runs = probe.runs + sweep.runs
    return sweep


def main(args: Any) -> int:
    """The `pdserve diagnose` command (flags in cli.py)."""
    from .plots import plot_diagnosis

    if args.source:
        result = BenchResult.load(Path(args.source))
        result.slo = Slo((args.slo_ttft_ms or 1e3 * result.slo.ttft_s) / 1e3,
                         (args.slo_tpot_ms or 1e3 * result.slo.tpot_s) / 1e3)
    else:
        config = main_config(args)
        result = asyncio.run(run_bench(config) if args.rates else _sweep(config))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.source:
        result.save(out.with_name(out.name + "-bench.json"))
    try:
        diagnosis = diagnose(result)
    except NothingToDiagnose as e:
        print(f"pdserve diagnose: {e}", file=sys.stderr)
        return 1
    print(report(diagnosis))
    out.with_name(out.name + ".json").write_text(json.dumps(dataclasses.asdict(diagnosis), indent=1, default=str))
    print(f"wrote {plot_diagnosis(diagnosis, out.with_name(out.name + '.png'))}")
    return 0
