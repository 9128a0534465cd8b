"""The router's Prometheus metrics: request timelines as histograms, pools as gauges.

Histograms come from the `PhaseTimings` of every finished request; gauges from
the replicas' own reports (the pool snapshot), so /metrics tells which phase
holds a deployment back: queue and prefill time against decode time per token.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

from .generation import PhaseTimings

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
_BYTES_BUCKETS = tuple(float(1 << s) for s in range(16, 34, 2))

HISTOGRAMS = {
    "pdserve_time_to_first_token_seconds": ("Request received to first token (TTFT)", _LATENCY_BUCKETS),
    "pdserve_time_per_output_token_seconds": ("Mean time per output token after the first (TPOT)", _LATENCY_BUCKETS),
    "pdserve_inter_token_latency_seconds": ("Time between two streamed chunks", _LATENCY_BUCKETS),
    "pdserve_e2e_request_latency_seconds": ("Request received to finish", _LATENCY_BUCKETS),
    "pdserve_prefill_queue_time_seconds": ("Time waiting in the prefill pool's queue", _LATENCY_BUCKETS),
    "pdserve_prefill_time_seconds": ("Prompt forward time on the prefill replica", _LATENCY_BUCKETS),
    "pdserve_kv_transfer_time_seconds": ("Time the KV handoff added after prefill's last layer", _LATENCY_BUCKETS),
    "pdserve_kv_transfer_bytes": ("KV bytes moved from prefill to decode per request", _BYTES_BUCKETS),
}

# (pool, stat key in the replica's report, metric name, help)
POOL_GAUGES = (
    ("prefill", "queued_tokens", "pdserve_prefill_queued_prompt_tokens", "Prompt tokens waiting for prefill"),
    ("prefill", "queued_requests", "pdserve_prefill_waiting_requests", "Requests waiting for prefill"),
    ("prefill", "tokens_per_s", "pdserve_prefill_tokens_per_second", "Prefill throughput on recent batches"),
    ("prefill", "mfu_busy", "pdserve_prefill_mfu_busy",
     "Achieved prefill FLOP/s over the GPU's matmul rate, per second the GPU was busy"),
    ("prefill", "mfu_wall", "pdserve_prefill_mfu_wall",
     "Achieved prefill FLOP/s over the GPU's matmul rate, per second of wall time between batches"),
    ("prefill", "gpu_idle_share", "pdserve_prefill_gpu_idle_share",
     "Share of recent batch periods the GPU had no work (1 - busy / wall): host-bound when high while prompts wait"),
    ("prefill", "gpu_batch_time_s", "pdserve_prefill_gpu_batch_seconds", "Mean GPU busy time of a recent prefill batch"),
    ("prefill", "prefix_hit_rate", "pdserve_prefill_prefix_cache_hit_rate",
     "Share of prompt tokens whose KV the prefill replica's prefix cache held"),
    ("prefill", "prefix_cached_blocks", "pdserve_prefill_prefix_cache_blocks", "KV blocks the prefix cache keeps"),
    ("decode", "num_running", "pdserve_decode_running_requests", "Sequences in the decode batch"),
    ("decode", "num_waiting", "pdserve_decode_waiting_requests", "Reserved or admitted sequences not yet running"),
    ("decode", "num_blocks_used", "pdserve_kv_blocks_used", "KV blocks held on the decode replica"),
    ("decode", "num_blocks_free", "pdserve_kv_blocks_free", "KV blocks free on the decode replica"),
    ("decode", "tokens_per_s", "pdserve_decode_tokens_per_second", "Decode throughput"),
    ("decode", "prefill_tokens_per_s", "pdserve_decode_prefill_tokens_per_second",
     "The decode replica's own prefill batches' prompt tokens/s (colocated, short prompts, failover)"),
    ("decode", "step_time_s", "pdserve_decode_step_seconds", "Mean recent decode step period (wall time)"),
    ("decode", "gpu_step_time_s", "pdserve_decode_gpu_step_seconds", "Mean GPU busy time of a recent decode step"),
    ("decode", "gpu_idle_share", "pdserve_decode_gpu_idle_share",
     "Share of recent step periods the GPU had no work (1 - busy / wall): host-bound when high while sequences run"),
    ("decode", "mbu_busy", "pdserve_decode_mbu_busy",
     "Achieved decode bytes/s over the GPU's copy rate, per second the GPU was busy"),
    ("decode", "mbu_wall", "pdserve_decode_mbu_wall",
     "Achieved decode bytes/s over the GPU's copy rate, per second of step wall time"),
)


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1


class RouterMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histograms = {name: _Histogram(buckets) for name, (_, buckets) in HISTOGRAMS.items()}
        self._outcomes: dict[str, int] = {}

    def observe_finished(self, timings: PhaseTimings) -> None:
        with self._lock:
            h = self._histograms
            h["pdserve_time_to_first_token_seconds"].observe(timings.ttft_s)
            h["pdserve_time_per_output_token_seconds"].observe(timings.tpot_s)
            h["pdserve_e2e_request_latency_seconds"].observe(timings.e2e_s)
            if timings.prefill_replica:
                h["pdserve_prefill_queue_time_seconds"].observe(timings.queue_s)
                h["pdserve_prefill_time_seconds"].observe(timings.prefill_s)
            if timings.kv_bytes:
                h["pdserve_kv_transfer_time_seconds"].observe(timings.kv_transfer_s)
                h["pdserve_kv_transfer_bytes"].observe(float(timings.kv_bytes))

    def observe_inter_token(self, seconds: float) -> None:
        with self._lock:
            self._histograms["pdserve_inter_token_latency_seconds"].observe(seconds)

    def count_outcome(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def render(self, pools: dict[str, dict[str, dict[str, Any]]], extra: str = "") -> str:
        """Prometheus text exposition: histograms, outcome counters, pool gauges."""
        lines: list[str] = []
        with self._lock:
            for name, (help_text, _) in HISTOGRAMS.items():
                lines += _histogram_lines(name, help_text, self._histograms[name])
            lines += ["# HELP pdserve_requests_total Finished requests by outcome", "# TYPE pdserve_requests_total counter"]
            lines += [f'pdserve_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self._outcomes.items())]
        for pool, key, name, help_text in POOL_GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for replica, stats in sorted(pools.get(pool, {}).items()):
                if key in stats and stats[key] is not None:
                    lines.append(f'{name}{{pool="{pool}",replica="{replica}"}} {float(stats[key]):g}')
        return "\n".join(lines) + "\n" + extra


def _histogram_lines(name: str, help_text: str, h: _Histogram) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip(h.buckets, h.counts):
        running += count
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
    lines += [f'{name}_bucket{{le="+Inf"}} {h.count}', f"{name}_sum {h.total:g}", f"{name}_count {h.count}"]
    return lines


def autoscaling_lines(note: dict[str, Any] | None) -> str:
    """The autoscaling policy's last note as pool-size gauges and a decisions counter by reason."""
    if not note:
        return ""
    lines = ["# HELP pdserve_pool_replicas Running replicas of the pool", "# TYPE pdserve_pool_replicas gauge"]
    pools = note.get("pools", {})
    lines += [f'pdserve_pool_replicas{{pool="{pool}"}} {p["replicas"]}' for pool, p in sorted(pools.items())]
    lines += ["# HELP pdserve_pool_target_replicas The autoscaling policy's target for the pool",
              "# TYPE pdserve_pool_target_replicas gauge"]
    lines += [f'pdserve_pool_target_replicas{{pool="{pool}"}} {p["target"]}' for pool, p in sorted(pools.items())]
    lines += ["# HELP pdserve_autoscaling_decisions_total Scaling decisions by pool, direction and reason",
              "# TYPE pdserve_autoscaling_decisions_total counter"]
    for key, count in sorted(note.get("decisions", {}).items()):
        pool, direction, reason = key.split("/")
        lines.append(f'pdserve_autoscaling_decisions_total{{pool="{pool}",direction="{direction}",reason="{reason}"}} {count}')
    return "\n".join(lines) + "\n"
