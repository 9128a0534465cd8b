"""What a bench's replicas and requests measured, as the diagnosis reads it: profiles, limits, step clocks.

The decode step-time model is fitted from the (batch, GPU busy time) points the decode
replicas reported across the whole run, one point per batch size, together with the
engine's own step times the replicas took at start (`engine/roofline.py`): a run that
held one loaded batch size is never extrapolated from that point alone. The host's
exposed time per step (wall - GPU busy) is fitted beside it. The limits (max_running,
KV blocks) are the ones the replicas report, not assumed.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from typing import Any

from .. import cost_model as cm
from .diagnosis import AloneRequest, ReplicaTimes, StepFit
from .result import BenchResult, Run

DEFAULT_ANCHOR_CONTEXT = 16  # tokens of context the start-up steps ran at, when the block size is not reported


def replica_reports(result: BenchResult) -> list[tuple[str, dict[str, Any]]]:
    """(pool, one replica's stats) of every pool sample taken while the runs went."""
    return [(pool, stats) for run in result.runs for sample in run.pools
            for pool, replicas in sample["pools"].items() for stats in replicas.values()]


def _status_reports(result: BenchResult, pool: str) -> list[dict[str, Any]]:
    status = result.target.get("status") or {}
    return list(status.get("pools", {}).get(pool, {}).values())


def fit_profiles(result: BenchResult, workload_tokens: float) -> tuple[cm.Profiles, StepFit]:
    """The cost model's profiles from the replicas' reports (or the requests' timings where none came), and
    where the decode model came from; `workload_tokens`: a sequence's mean prompt + output length."""
    reports = replica_reports(result)
    rates = [s["tokens_per_s"] for pool, s in reports if pool == "prefill" and s.get("tokens_per_s", 0) > 0]
    timed = [(q.prompt_tokens, q.server) for run in result.runs for q in run.requests if q.is_ok and q.server]
    if not rates:  # colocated: the replica that decodes a prompt prefills it, in batches of its own
        rates = [s["prefill_tokens_per_s"] for pool, s in reports
                 if pool == "decode" and s.get("prefill_tokens_per_s", 0) > 0]
    if not rates:  # no report says (an older server's JSON): each prompt over its batch's time, a lower bound
        rates = [n / t["prefill_s"] for n, t in timed if t.get("prefill_s", 0) > 0]
    handoff = statistics.median([t.get("kv_transfer_s", 0.0) for _, t in timed]) if timed else 0.0
    decode_reports = [s for pool, s in reports if pool == "decode"] + _status_reports(result, "decode")
    fit = _step_fit(decode_reports, workload_tokens)
    limit = min(x for x in (fit.max_running, fit.max_by_kv, 10 ** 6) if x is not None)
    decode = _decode_profile([s for pool, s in reports if pool == "decode"], fit, limit)
    if decode is None:  # no reports: the requests' own time per output token, as a constant step
        tpots = [t["tpot_s"] for _, t in timed if t.get("tpot_s", 0) > 0]
        decode = cm.DecodeProfile(statistics.median(tpots or [0.0]), max_running=limit)
    prefill = cm.PrefillProfile(statistics.median(rates) if rates else 0.0, handoff, _replica_gpus(result, "prefill"))
    return cm.Profiles(prefill, dataclasses.replace(decode, num_gpus=_replica_gpus(result, "decode"))), fit


def _replica_gpus(result: BenchResult, pool: str) -> float:
    """The GPUs one replica of `pool` holds, as the replicas report it (a TP replica holds several)."""
    reports = [s for p, s in replica_reports(result) if p == pool] + _status_reports(result, pool)
    return max((float(s["num_gpus"]) for s in reports if s.get("num_gpus")), default=1.0)


def _step_fit(reports: list[dict[str, Any]], workload_tokens: float) -> StepFit:
    anchors = next((tuple((int(b), float(s)) for b, s in r["engine_steps"]) for r in reports if r.get("engine_steps")),
                   ())
    max_running = max((int(r["max_running"]) for r in reports if r.get("max_running")), default=None)
    blocks = max((int(r["num_blocks_total"]) for r in reports if r.get("num_blocks_total")), default=None)
    block_size = next((int(r["kv_block_size"]) for r in reports if r.get("kv_block_size")), None)
    by_kv = None
    if blocks and block_size and workload_tokens > 0:
        by_kv = blocks // max(math.ceil(workload_tokens / block_size), 1)
    batches = tuple(sorted(_by_batch(reports, "gpu_step_time_s") or _by_batch(reports, "step_time_s")))
    return StepFit(len(batches), len(_by_batch(_exposed(reports), "host_s")), batches, anchors, max_running, blocks,
                   block_size, by_kv)


def _exposed(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports with a step clock, each with its host time per step the GPU did not hide."""
    return [{**r, "host_s": r["step_time_s"] * r["gpu_idle_share"]} for r in reports
            if r.get("gpu_step_time_s", 0) > 0 and r.get("gpu_idle_share") is not None]


# A report's batch size is its window's mean; one taken while the batch ramped up (the window's mean far
# from the sequences running when it was read) averages steps of other sizes, often with one-off costs
# (graph captures, start-up prefills), and would bend the fit: such windows are left out.
STEADY_WINDOW = 0.25  # |window mean batch - running now| <= this share of running now


def _by_batch(reports: list[dict[str, Any]], key: str) -> dict[float, tuple[float, float]]:
    """{batch size (rounded): (mean `key`, mean context per sequence)} over the steady samples that were stepping."""
    groups: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for r in reports:
        if r.get("num_running", 0) > 0 and r.get("batch_size", 0) > 0 and r.get(key, 0) > 0 and _steady(r):
            context = r.get("num_context_tokens", 0) / r["num_running"]
            groups[round(r["batch_size"])].append((r[key], context))
    return {b: (statistics.fmean(v for v, _ in g), statistics.fmean(c for _, c in g)) for b, g in groups.items()}


def _steady(report: dict[str, Any]) -> bool:
    return abs(report["batch_size"] - report["num_running"]) <= STEADY_WINDOW * report["num_running"]


def _decode_profile(reports: list[dict[str, Any]], fit: StepFit, limit: int) -> cm.DecodeProfile | None:
    """GPU time from the run's points and the start-up anchors; host time per step beside it."""
    gpu = [cm.StepSample(b, s, c) for b, (s, c) in _by_batch(reports, "gpu_step_time_s").items()]
    if not gpu and not fit.anchors:  # replicas without a step clock: the step's wall time, as before
        wall = [cm.StepSample(b, s, c) for b, (s, c) in _by_batch(reports, "step_time_s").items()]
        return cm.DecodeProfile.fit(wall, limit) if wall else None
    context = fit.kv_block_size or DEFAULT_ANCHOR_CONTEXT
    gpu += [cm.StepSample(b, s, context) for b, s in fit.anchors]
    host = [cm.StepSample(b, s) for b, (s, _) in _by_batch(_exposed(reports), "host_s").items()]
    return cm.DecodeProfile.measured(gpu, host, limit)


def replica_times(run: Run, colocated: bool) -> ReplicaTimes:
    """A run's step-clock readings: decode's over the samples with sequences running, prefill's with prompts queued."""
    decode = [r for s in run.pools for r in s["pools"].get("decode", {}).values() if r.get("num_running", 0) > 0]
    prefill = [r for s in run.pools for r in s["pools"].get("prefill", {}).values() if r.get("queued_requests", 0) > 0]

    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    clocked = [r for r in decode if r.get("gpu_step_time_s", 0) > 0]
    batches = [r for r in prefill if r.get("gpu_batch_time_s", 0) > 0]
    return ReplicaTimes(
        decode_step_s=mean(decode, "step_time_s"), decode_gpu_step_s=mean(clocked, "gpu_step_time_s"),
        decode_launch_s=mean(clocked, "launch_time_s"), decode_idle_share=mean(clocked, "gpu_idle_share"),
        decode_waiting=mean(decode, "num_waiting") or 0.0,
        prefill_idle_share=(mean(clocked, "gpu_idle_share") if colocated
                            else mean(batches, "gpu_idle_share")),
        prefill_queued=mean(prefill, "queued_requests") or 0.0,
        prefill_gpu_batch_s=mean(batches, "gpu_batch_time_s"), prefill_launch_s=mean(batches, "launch_time_s"))


def alone_request(result: BenchResult) -> AloneRequest | None:
    """The requests no other request overlapped in time: what one request costs with the server to itself."""
    alone = []
    for run in result.runs:
        ok = sorted((q for q in run.requests if q.is_ok), key=lambda q: q.sent_at)
        spans = [(q.sent_at, q.sent_at + q.e2e_s) for q in run.requests if q.e2e_s is not None]
        for q in ok:
            start, end = q.sent_at, q.sent_at + q.e2e_s
            if sum(1 for s, e in spans if s < end and e > start) == 1:  # only itself
                alone.append(q)
    if not alone:
        return None
    tpots = [q.tpot_s for q in alone if q.tpot_s is not None]
    return AloneRequest(len(alone), statistics.median(q.ttft_s for q in alone),
                        statistics.median(tpots) if tpots else None)


def prefix_hit_rate(result: BenchResult) -> float:
    """The prefill replicas' prefix-cache hit rate at the last report (each counts since its start)."""
    last = [sample for run in result.runs for sample in run.pools if sample["pools"].get("prefill")]
    rates = [r.get("prefix_hit_rate", 0.0) for r in last[-1]["pools"]["prefill"].values()] if last else []
    return statistics.fmean(rates) if rates else 0.0


def hardware_lines(result: BenchResult, profiles: cm.Profiles, fit: StepFit) -> list[str]:
    """How close each phase runs to its hardware limit, over GPU-busy time and over wall time, and the limits."""
    reports = [stats for _, stats in replica_reports(result)]

    def top(key: str) -> str:
        values = [r[key] for r in reports if r.get(key)]
        return f"{100 * max(values):.0f}%" if values else "-"

    lines = []
    if any(r.get(k) for r in reports for k in ("mfu_busy", "mfu_wall", "mbu_busy", "mbu_wall")):
        lines.append(f"prefill MFU {top('mfu_busy')} of GPU-busy time, {top('mfu_wall')} of wall time; decode MBU "
                     f"{top('mbu_busy')} of GPU-busy time, {top('mbu_wall')} of wall time (of the GPU's measured "
                     "matmul and copy rates; busy: while it had work, wall: the whole step period)")
    else:
        lines.append("MFU and MBU: not reported by these replicas. On the CPU they are not meaningful "
                     "(no matmul or copy peak to hold them against); what is known:")
    d = profiles.decode
    anchors = ", ".join(f"batch {b}: {1e3 * s:.1f} ms" for b, s in fit.anchors)
    if fit.num_points:
        source = f"fitted from {fit.num_points} batch size(s) measured across the run" + (
            f" and the engine's own steps at start ({anchors})" if anchors else "")
    elif anchors:
        source = f"no loaded step was sampled: the engine's own steps at start ({anchors})"
    else:
        source = "no step was sampled: the requests' own TPOT, as a constant step"
    lines.append(f"prefill {profiles.prefill.tokens_per_s:,.0f} prompt tokens/s per replica; decode step on the GPU "
                 f"{1e3 * d.gpu_step_time(1):.1f} ms at batch 1, +{1e3 * d.per_seq_s:.3f} ms per running sequence "
                 f"({source}); the host adds {1e3 * d.host_step_time(1):.1f} ms a step at batch 1, "
                 f"+{1e3 * d.host_per_seq_s:.3f} ms per sequence"
                 + (" (measured at one batch size only, so taken as constant: a run at another, such as "
                    "the sweep's one-at-a-time run, pins its slope)" if fit.num_host_points == 1 else ""))
    kv = (f", KV blocks {fit.kv_blocks:,} ({fit.max_by_kv:,} sequences of this workload's length)"
          if fit.kv_blocks and fit.max_by_kv is not None else "")
    running = f"decode.max_running {fit.max_running}" if fit.max_running else "decode.max_running not reported"
    lines.append(f"limits, as the decode replicas report them: {running}{kv}; the model's batch limit "
                 f"{d.max_running}")
    timed = [q.server for run in result.runs for q in run.requests if q.is_ok and q.server and q.server.get("kv_bytes")]
    if timed:
        per_request = statistics.median(t["kv_bytes"] for t in timed)
        exposed = statistics.median(t["kv_transfer_s"] for t in timed)
        achieved = statistics.median(t["kv_bytes"] / max(t["prefill_s"] + t["kv_transfer_s"], 1e-9) for t in timed)
        lines.append(f"KV handoff: {per_request / 2**20:.2f} MiB per request, {1e3 * exposed:.1f} ms exposed after "
                     f"prefill (median); at least {achieved / 1e6:,.1f} MB/s achieved (the push overlaps prefill "
                     "layer by layer, so this is bounded by prefill compute, not by the link)")
    return lines
