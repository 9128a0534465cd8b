"""The diagnosis in plain words: the table of load points, the verdict with its numbers, the advice."""
from __future__ import annotations

import math

from .diagnosis import HOST_PARTS, Diagnosis, LoadPoint

ADVICE = {
    "decode loop": "less host work per step (fewer Python operations per token, tokens sent to the stream "
                   "server per step in one batch), or more decode replicas each running a smaller batch",
    "kernel launches": "CUDA graphs up to the batch the replica runs (the engine launches eagerly above its "
                       "largest graph), or a smaller decode.max_running",
    "prefill loop": "less host work between prefill batches (a larger prefill.max_batch_tokens batches more "
                    "prompts per launch)",
    "prefill launches": "prompts within the prefill CUDA graphs (up to 8 prompts and 512 tokens in all, "
                        "which the replicas batch to on their own; longer prompts launch eagerly), more prefill "
                        "replicas (each launches its own batches), or a GPU replica started with its graphs captured",
    "router": "more CPU for the router (more router replicas, fewer other processes on its node)",
    "front end": "more router replicas (router.replicas) or more CPU on their nodes, or the client closer",
    "client": "a client that keeps up: more client processes (`--processes N`) or machines, fewer streams per process",
}


def _rate(rps: float) -> str:
    return "unbounded" if math.isinf(rps) else f"{rps:.2f} req/s"


def _share(value: float | None) -> str:
    return "   -" if value is None else f"{100 * value:3.0f}%"


def _verdict_word(p: LoadPoint) -> str:
    return f"HOST ({p.host_part})" if p.bottleneck == "host" else p.bottleneck


def report(d: Diagnosis) -> str:
    """The diagnosis in plain words, with its numbers."""
    slo, w = d.slo, d.workload
    cached = f" ({w.prefix_hit_rate:.0%} from the prefix cache)" if w.prefix_hit_rate else ""
    lines = [f"pdserve diagnose: {d.deployment}; workload {w.prompt_tokens:.0f} prompt{cached} → {w.output_tokens:.0f} "
             f"output tokens; SLO TTFT {1e3 * slo.ttft_s:g} ms, TPOT {1e3 * slo.tpot_s:g} ms (p90)", "",
             "   load → done  goodput | TTFT p90 = [queue prefill   KV | router front] ms | prefill p90 ×SLO "
             "| TPOT p90 ×SLO | prefill util  decode batch | GPU idle P  D | bottleneck"]
    for p in d.points:
        offered = f"{p.offered_rps:g}" if p.offered_rps is not None else "closed"
        r = p.replicas
        lines.append(
            f"{offered:>7} → {p.throughput_rps:4.2f}  {p.goodput_rps:7.2f} | {1e3 * p.ttft_p90_s:8.0f} = "
            f"[{1e3 * p.queue_s:5.0f} {1e3 * p.prefill_s:7.0f} {1e3 * p.kv_transfer_s:4.0f} | "
            f"{1e3 * p.router_s:6.0f} {1e3 * p.frontend_s:5.0f}]    | {p.prefill_ratio:10.2f}×     "
            f"| {1e3 * p.tpot_p90_s:5.0f} {p.decode_ratio:5.2f}× | {100 * p.prefill_utilisation:11.0f}%  "
            f"{p.decode_batch:12.1f} |    {_share(r.prefill_idle_share)} {_share(r.decode_idle_share)} "
            f"| {_verdict_word(p)}")
    lines += ["(TTFT parts are server means; 'prefill p90' is queue + prefill + KV at p90, the part of TTFT the "
              "prefill pool owns; router: routing + decode reservation + relay; front: HTTP proxy + network; "
              "GPU idle: 1 - GPU busy / wall time of the prefill batches and decode steps while they had work)", ""]
    lines += _verdict(d)
    if d.colocated:
        lines.append("Colocated: prompts are prefilled between decode steps on the same replica, so TPOT here also "
                     "pays for prefill; the split below is what disaggregating this workload is predicted to give.")
    agree = "agrees" if d.model_bottleneck == d.phase else "DISAGREES (trust the measurement)"
    lines.append(f"The cost model, at these sizes and {w.arrival_rate:.2f} req/s, {agree} on the phase at stake: "
                 f"{d.model_bottleneck}.")
    lines += ["", "Hardware:"] + [f"  {line}" for line in d.hardware] + [""]
    lines += _splits(d)
    return "\n".join(lines)


def _verdict(d: Diagnosis) -> list[str]:
    top = max(d.points, key=lambda p: p.throughput_rps)
    worst = next(p for p in d.points if p.throughput_rps == d.broken_at_rps) if d.broken_at_rps is not None else top
    name = f"HOST ({d.host_part})" if d.bottleneck == "host" else d.bottleneck.upper()
    if d.broken_at_rps is not None:
        lines = [f"Bottleneck: {name}. From {d.broken_at_rps:.2f} req/s " + _why(worst)]
    else:
        lines = [f"No phase broke its SLO up to {top.throughput_rps:.2f} req/s; the closest is {name} "
                 f"({top.stake_ratio:.2f}× its SLO): " + _why(worst)]
    if d.bottleneck == "host":
        lines.append(f"  The {d.phase} GPU is not what binds, so faster GPUs will not help; what would: "
                     f"{ADVICE[d.host_part]}.")
    return lines


def _why(p: LoadPoint) -> str:
    if p.bottleneck == "host":
        metric = "TTFT" if p.phase == "prefill" else "TPOT"
        return f"{metric} reaches {p.stake_ratio:.1f}× its SLO at p90, held by {HOST_PARTS[p.host_part]}: {p.host_why}."
    busy = p.replicas.decode_idle_share if p.phase == "decode" else p.replicas.prefill_idle_share
    gpu = "" if busy is None else f" (its GPU busy {100 * (1 - busy):.0f}% of the time)"
    if p.phase == "prefill":
        waiting = p.queue_s / max(p.queue_s + p.prefill_s + p.kv_transfer_s, 1e-9)
        return (f"queue + prefill + KV reach {p.prefill_ratio:.1f}× the TTFT SLO at p90; {100 * waiting:.0f}% of "
                f"that is waiting for prefill, the prefill pool runs at {100 * p.prefill_utilisation:.0f}% of its "
                f"measured rate{gpu}.")
    return (f"TPOT reaches {p.decode_ratio:.1f}× its SLO at p90: decode runs batches of {p.decode_batch:.1f}, "
            f"each step stretching every running request's TPOT{gpu}.")


def _splits(d: Diagnosis) -> list[str]:
    lines = [f"P:D ratio (cost model, goodput per GPU, up to {d.max_replicas} replicas): best "
             f"{d.best.num_prefill}:{d.best.num_decode} → {_rate(d.best.max_goodput_rps)} holding both SLOs on "
             f"{d.best.num_gpus:g} GPUs, {d.best.per_gpu_rps:.2f} per GPU"]
    b, now = d.baseline, ("as 1 prefill + 1 decode" if d.colocated else "deployed")
    gain = "no gain" if d.gain <= 1e-6 else ("from nothing" if math.isinf(d.gain) else f"+{100 * d.gain:.0f}%")
    lines.append(f"  the current ratio scaled to {b.num_prefill}:{b.num_decode}: {_rate(b.max_goodput_rps)}, "
                 f"{b.per_gpu_rps:.2f} per GPU → expected gain {gain} in goodput per GPU")
    # colocated, the prediction is for a split of twice the GPUs: compare per GPU, not the totals
    measured, deployed_gpus = max(p.goodput_rps for p in d.points), _deployed_gpus(d)
    lines.append(f"  {d.current.num_prefill}:{d.current.num_decode} {now}: predicted {_rate(d.current.max_goodput_rps)}"
                 f" on {d.current.num_gpus:g} GPUs ({d.current.per_gpu_rps:.2f} per GPU); measured: best goodput "
                 f"{measured:.2f} req/s on the {deployed_gpus:g} deployed ({measured / deployed_gpus:.2f} per GPU)")
    if d.best.max_goodput_rps == 0:
        lines.append("  " + _no_split(d))
    return lines


def _deployed_gpus(d: Diagnosis) -> float:
    """The GPUs the measured deployment holds (a colocated replica: as a decode replica)."""
    gpus = d.num_decode * d.profiles.decode.num_gpus + (0 if d.colocated else d.num_prefill * d.profiles.prefill.num_gpus)
    return gpus or 1.0


def _no_split(d: Diagnosis) -> str:
    """Why no split holds: a single request slower than the SLO only when one was measured to be."""
    a, slo = d.alone, d.slo
    if a is None:
        return ("No split holds both SLOs in the cost model, and no request ran alone in this bench, so whether a "
                "single request meets the SLO is unmeasured (`pdserve bench --concurrency 1` measures it).")
    tpot = "-" if a.tpot_s is None else f"{1e3 * a.tpot_s:.1f} ms"
    alone = f"measured alone ({a.count} request{'s' if a.count != 1 else ''}, medians): TTFT {1e3 * a.ttft_s:.0f} ms, TPOT {tpot}"
    if a.ttft_s > slo.ttft_s or (a.tpot_s is not None and a.tpot_s > slo.tpot_s):
        return (f"No split holds both SLOs even at a trickle: a single request is slower than the SLO, {alone} "
                "(faster replicas, shorter prompts or looser SLOs are needed, not another ratio).")
    return (f"No split holds both SLOs in the cost model, yet a single request meets them, {alone}: what breaks "
            "them is what load adds, not a request's own cost.")
