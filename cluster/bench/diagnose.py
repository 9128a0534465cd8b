"""`pdserve diagnose`: what limits a deployment (a phase's GPU, or the host), at which load, and what to change.

From a bench result (read, or a short sweep run now):
1. per offered load, the measured p90 TTFT and TPOT against their SLOs, TTFT split
   into queue / prefill / KV handoff / router / front end by the server's timings;
   the phase further past (or closer to) its SLO is at stake, and `verdict.py`
   names that phase only when its GPU was busy, else the HOST part that held it
   (decode loop, kernel launches, prefill loop, router, front end, the client);
   the deployment's bottleneck is the one at the lowest load that broke an SLO;
2. the replicas' own reports (prefill tokens/s; decode GPU time per step against
   batch size across the run, anchored by the engine's own steps at start; the
   host's exposed time per step; max_running and KV blocks) become the cost
   model's profiles (`cluster/cost_model.py`, the one the autoscaler uses); it
   predicts, for every prefill:decode split up to `MAX_REPLICAS`, the highest rate
   that holds both SLOs, and the split with the most goodput per GPU is the
   recommendation (a replica of tensor parallelism N counts N GPUs);
3. with `--confirm`, the deployment is offered the rate the model predicts for its own
   sizes, and the measured goodput says whether the model holds there (`confirm.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from .. import cost_model as cm
from .confirm import confirm, unconfirmable
from .diagnosis import MAX_REPLICAS, Diagnosis, LoadPoint, Split
from .measured import alone_request, fit_profiles, hardware_lines, prefix_hit_rate, replica_times
from .report import report
from .result import BenchResult, Run
from .run import BenchConfig, main_config, run_bench
from .stats import RunSummary, Slo, percentile
from .verdict import decide

PROBE_CONCURRENCY = 4
ALONE_REQUESTS = 2  # the sweep's first run: one request at a time, what a request costs with the server to itself
SWEEP_FRACTIONS = (0.4, 0.8, 1.2)  # of the probe's throughput

__all__ = ["NothingToDiagnose", "diagnose", "main", "max_goodput", "report"]


class NothingToDiagnose(ValueError):
    """A bench result with no successful request: no phase can be timed."""


def diagnose(result: BenchResult) -> Diagnosis:
    """Explain a bench result; pure, so tests can feed it recorded runs."""
    status = result.target.get("status") or {}
    pools = status.get("pools", {})
    colocated = bool(status.get("colocated"))
    num_prefill = 0 if colocated else max(len(pools.get("prefill", {})), 1)
    num_decode = max(len(pools.get("decode", {})), 1)
    ok = [q for run in result.runs for q in run.requests if q.is_ok]
    if not ok:
        errors = [q.error for run in result.runs for q in run.requests if q.error]
        raise NothingToDiagnose("no request of the bench succeeded" + (f"; the first failed with: {errors[0]}"
                                                                         if errors else ""))
    slo, summaries = result.slo, [run.summary(result.slo) for run in result.runs]
    workload = cm.Workload(max(s.throughput_rps for s in summaries), statistics.fmean(q.prompt_tokens for q in ok),
                           statistics.fmean(q.output_tokens for q in ok), prefix_hit_rate=prefix_hit_rate(result))
    profiles, fit = fit_profiles(result, workload.prompt_tokens + workload.output_tokens)
    points = sorted((_point(run, summary, slo, profiles, max(num_prefill, 1), workload, colocated)
                     for run, summary in zip(result.runs, summaries)), key=lambda p: p.throughput_rps)
    broken = next((p for p in points if p.stake_ratio > 1), None)
    verdict = broken or max(points, key=lambda p: p.stake_ratio)
    at_current = cm.predict(workload, max(num_prefill, 1), num_decode, profiles, slo)
    splits = [_split(workload, p, d, profiles, slo) for p in range(1, MAX_REPLICAS) for d in range(1, MAX_REPLICAS - p + 1)]
    best = max(splits, key=lambda s: (round(s.per_gpu_rps, 9), -s.num_gpus))
    current_sizes = (1, 1) if colocated else (num_prefill, num_decode)
    current = _split(workload, *current_sizes, profiles, slo)
    name = f"colocated x{num_decode}" if colocated else f"{num_prefill} prefill + {num_decode} decode"
    return Diagnosis(name, colocated, num_prefill, num_decode, slo, workload, profiles, points, verdict.bottleneck,
                     verdict.host_part, verdict.phase, broken.throughput_rps if broken else None, at_current.bottleneck,
                     current, _scaled(splits, current_sizes), best, splits, hardware_lines(result, profiles, fit), fit,
                     alone_request(result))


def _split(workload: cm.Workload, num_prefill: int, num_decode: int, profiles: cm.Profiles, slo: cm.Slo) -> Split:
    return Split(num_prefill, num_decode, max_goodput(workload, num_prefill, num_decode, profiles, slo),
                 cm.num_gpus(num_prefill, num_decode, profiles))


def _scaled(splits: list[Split], sizes: tuple[int, int]) -> Split:
    """The current ratio at the most replicas searched: `sizes` times k, with k·(p + d) <= MAX_REPLICAS."""
    k = max(MAX_REPLICAS // sum(sizes), 1)
    return next(s for s in splits if (s.num_prefill, s.num_decode) == (k * sizes[0], k * sizes[1]))


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
           workload: cm.Workload, colocated: bool) -> LoadPoint:
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
    server_tpots = sorted(q.server["tpot_s"] for q in timed if q.server.get("tpot_s", 0) > 0 and q.output_tokens > 1)
    server_tpot = percentile(server_tpots, 90) if server_tpots else 0.0
    parts = {"queue": mean["queue_s"], "prefill": mean["prefill_s"], "kv": mean["kv_transfer_s"],
             "router": max(mean["ttft_s"] - mean["queue_s"] - mean["prefill_s"] - mean["kv_transfer_s"], 0.0),
             "front": max(client_ttft - mean["ttft_s"], 0.0) if timed else 0.0}
    prefill_ratio, decode_ratio = prefill_phase / slo.ttft_s, (summary.tpot.p90 or 0.0) / slo.tpot_s
    replicas = replica_times(run, colocated)
    ttft_ratio = (summary.ttft.p90 or 0.0) / slo.ttft_s
    verdict = decide(prefill_ratio, ttft_ratio, decode_ratio, parts, summary.tpot.p90 or 0.0, server_tpot, replicas,
                     run.client_lag_s)
    return LoadPoint(
        offered_rps=summary.rate, throughput_rps=summary.throughput_rps, goodput_rps=summary.goodput_rps,
        ttft_p90_s=summary.ttft.p90 or 0.0, prefill_phase_p90_s=prefill_phase, tpot_p90_s=summary.tpot.p90 or 0.0,
        queue_s=parts["queue"], prefill_s=parts["prefill"], kv_transfer_s=parts["kv"], router_s=parts["router"],
        frontend_s=parts["front"],
        prefill_utilisation=summary.throughput_rps * mean_computed / capacity if capacity else 0.0,
        decode_batch=statistics.fmean(batches) if batches else 0.0,
        prefill_ratio=prefill_ratio, decode_ratio=decode_ratio, stake_ratio=verdict.ratio, server_tpot_p90_s=server_tpot, replicas=replicas,
        client_lag_s=run.client_lag_s, phase=verdict.phase, bottleneck=verdict.bottleneck,
        host_part=verdict.host_part, host_why=verdict.why,
    )


async def _sweep(config: BenchConfig) -> BenchResult:
    """One request at a time, a closed-loop probe for capacity, then Poisson runs around it."""
    alone = await run_bench(dataclasses.replace(config, rates=(None,), concurrency=1, num_requests=ALONE_REQUESTS))
    probe = await run_bench(dataclasses.replace(config, rates=(None,), concurrency=PROBE_CONCURRENCY, warmup=0))
    capacity = probe.runs[0].summary(config.slo).throughput_rps
    rates = tuple(round(f * capacity, 3) for f in SWEEP_FRACTIONS)
    sweep = await run_bench(dataclasses.replace(config, rates=rates, warmup=0))
    sweep.runs = alone.runs + probe.runs + sweep.runs
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
    written = dataclasses.asdict(diagnosis)
    if args.confirm:
        why_not = unconfirmable(diagnosis)
        checked = None if why_not else asyncio.run(confirm(diagnosis, dataclasses.replace(main_config(args),
                                                                                         slo=diagnosis.slo)))
        print(why_not or "\n".join(checked.lines()))
        written["confirmation"] = checked and {**dataclasses.asdict(checked), "goodput_rps": checked.goodput_rps,
                                               "confirmed": checked.confirmed}
    out.with_name(out.name + ".json").write_text(json.dumps(written, indent=1, default=str))
    print(f"wrote {plot_diagnosis(diagnosis, out.with_name(out.name + '.png'))}")
    return 0
