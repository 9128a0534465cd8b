"""One load point's verdict: the phase whose SLO is at stake, and whether its GPU or the host holds it back.

A phase (PREFILL, DECODE) is named only when that phase's GPU was busy; when it idled
while requests waited, or the time went outside the replicas, the verdict is HOST and
names the part:
- decode (TPOT): the client saw a much slower TPOT than the router did -> the front
  end (proxy, network), or the client itself when its own event loop lagged; else a
  decode GPU idle for much of each step -> the decode loop's host work, or kernel
  launches when the GPU's busy time is no more than the time spent launching it;
- prefill (TTFT): the client's TTFT broke its SLO and routing and the front end took
  more of it than the prefill pool did -> the router or the front end (or the client);
  else a prefill batch's GPU time no more than the time spent launching it -> prefill
  launches; else prompts queued while the prefill GPU idled -> the prefill loop.
"""
from __future__ import annotations

from dataclasses import dataclass

from .diagnosis import ReplicaTimes

HOST_IDLE_SHARE = 0.5  # a GPU idle for at least half of each step is waiting on the host
RELAY_FACTOR = 2.0  # the client's TPOT at least this many times the router's: the time went after the router
LAUNCH_BOUND = 0.8  # GPU busy no more than launch time / this: the kernels waited for their launches
CLIENT_LAG_S = 0.005  # a client loop waking this late (p90) is too busy to read its streams: the client, not the proxy


@dataclass(frozen=True)
class Verdict:
    phase: str  # "prefill" | "decode"
    ratio: float  # how far the phase at stake is past (> 1) or inside its SLO
    bottleneck: str  # "prefill" | "decode" | "host"
    host_part: str = ""
    why: str = ""  # the measurement, in words, when host


def decide(prefill_ratio: float, ttft_ratio: float, decode_ratio: float, ttft_parts: dict[str, float],
           client_tpot_s: float, server_tpot_s: float, replicas: ReplicaTimes, client_lag_s: float) -> Verdict:
    """`prefill_ratio`: the prefill pool's part of TTFT (p90) over the SLO; `ttft_ratio`: the client's TTFT
    (p90) over it; `ttft_parts`: mean seconds of queue, prefill, kv, router and front in TTFT."""
    outside = ttft_parts["router"] + ttft_parts["front"] > ttft_parts["queue"] + ttft_parts["prefill"] + ttft_parts["kv"]
    ttft_stake = max(prefill_ratio, ttft_ratio) if outside and ttft_ratio > 1 else prefill_ratio
    if ttft_stake >= decode_ratio:
        return _prefill(ttft_stake, ttft_parts, replicas, client_lag_s, outside and ttft_ratio > 1)
    return _decode(decode_ratio, client_tpot_s, server_tpot_s, replicas, client_lag_s)


def _decode(ratio: float, client_tpot_s: float, server_tpot_s: float, r: ReplicaTimes,
            client_lag_s: float) -> Verdict:
    if server_tpot_s > 0 and client_tpot_s >= RELAY_FACTOR * server_tpot_s:
        part = "client" if client_lag_s >= CLIENT_LAG_S else "front end"
        return Verdict("decode", ratio, "host", part,
                       f"the client's TPOT {1e3 * client_tpot_s:.1f} ms p90 against the router's "
                       f"{1e3 * server_tpot_s:.1f} ms; the client's own loop lagged {1e3 * client_lag_s:.0f} ms p90")
    if r.decode_idle_share is not None and r.decode_idle_share >= HOST_IDLE_SHARE:
        gpu, wall, launch = r.decode_gpu_step_s or 0.0, r.decode_step_s or 0.0, r.decode_launch_s or 0.0
        part = "kernel launches" if launch > 0 and gpu <= launch / LAUNCH_BOUND else "decode loop"
        return Verdict("decode", ratio, "host", part,
                       f"the decode GPU idled {100 * r.decode_idle_share:.0f}% of each step: {1e3 * wall:.1f} ms a "
                       f"step, {1e3 * gpu:.1f} ms of it on the GPU" + (f", {1e3 * launch:.1f} ms launching it"
                                                                      if launch else ""))
    return Verdict("decode", ratio, "decode")


def _prefill(ratio: float, parts: dict[str, float], r: ReplicaTimes, client_lag_s: float, outside: bool) -> Verdict:
    pool = parts["queue"] + parts["prefill"] + parts["kv"]
    if outside:
        if parts["router"] >= parts["front"]:
            part = "router"
        else:
            part = "client" if client_lag_s >= CLIENT_LAG_S else "front end"
        return Verdict("prefill", ratio, "host", part,
                       f"{1e3 * parts['router']:.0f} ms of TTFT in the router and {1e3 * parts['front']:.0f} ms in "
                       f"front of it against {1e3 * pool:.0f} ms in the prefill pool (means)")
    gpu, launch = r.prefill_gpu_batch_s or 0.0, r.prefill_launch_s or 0.0
    if launch > 0 and gpu <= launch / LAUNCH_BOUND:
        return Verdict("prefill", ratio, "host", "prefill launches",
                       f"a prefill batch took {1e3 * gpu:.1f} ms on the GPU and {1e3 * launch:.1f} ms launching it "
                       f"(its kernels waited for Python)")
    idle = r.prefill_idle_share
    if idle is not None and idle >= HOST_IDLE_SHARE and parts["queue"] > parts["prefill"]:
        return Verdict("prefill", ratio, "host", "prefill loop",
                       f"prompts waited {1e3 * parts['queue']:.0f} ms on average while the prefill GPU idled "
                       f"{100 * idle:.0f}% of each batch period")
    return Verdict("prefill", ratio, "prefill")
