"""From a run's request records to its numbers: throughput, latency percentiles, goodput.

Goodput (DistServe): requests per second that finished and met both SLOs,
TTFT <= slo.ttft_s and TPOT <= slo.tpot_s (a one-token answer has no TPOT and
meets that SLO). Both rates divide by the same duration, so goodput <= throughput.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .client import RequestRecord
from ..cost_model import Slo  # one SLO for the bench, the diagnosis and the autoscaler

QUANTILES = (50, 90, 99)
SERVER_PHASES = ("queue_s", "prefill_s", "kv_transfer_s", "ttft_s", "tpot_s", "e2e_s")


@dataclass(frozen=True)
class Latency:
    """Percentiles and mean of one latency, in seconds (None when nothing was measured)."""

    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Latency":
        data = sorted(values)
        if not data:
            return cls(None, None, None, None, 0)
        p50, p90, p99 = (percentile(data, q) for q in QUANTILES)
        return cls(p50, p90, p99, sum(data) / len(data), len(data))


@dataclass(frozen=True)
class RunSummary:
    """One run at one offered load."""

    rate: float | None  # offered requests/s (None: as fast as the concurrency allows)
    concurrency: int | None
    num_requests: int
    num_ok: int
    num_failed: int
    num_good: int
    duration_s: float
    throughput_rps: float
    goodput_rps: float
    slo_attainment: float  # good / sent
    input_tokens_per_s: float
    output_tokens_per_s: float
    ttft: Latency
    tpot: Latency
    itl: Latency
    e2e: Latency
    server: dict[str, Latency]  # the server's phase timings: queue, prefill, KV transfer, ...


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, interpolating linearly (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """Finished, first token within the TTFT SLO, and (if it has one) TPOT within the TPOT SLO."""
    if not record.is_ok or record.ttft_s > slo.ttft_s:
        return False
    return record.tpot_s is None or record.tpot_s <= slo.tpot_s


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo, rate: float | None,
              concurrency: int | None) -> RunSummary:
    """The run's numbers; `duration_s` runs from the first send to the last answer."""
    ok = [r for r in records if r.is_ok]
    num_good = sum(meets_slo(r, slo) for r in records)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    timed = [r.server for r in ok if r.server]
    return RunSummary(
        rate=rate, concurrency=concurrency, num_requests=len(records), num_ok=len(ok),
        num_failed=len(records) - len(ok), num_good=num_good, duration_s=duration_s,
        throughput_rps=len(ok) * per_s, goodput_rps=num_good * per_s,
        slo_attainment=num_good / len(records) if records else 0.0,
        input_tokens_per_s=sum(r.prompt_tokens for r in ok) * per_s,
        output_tokens_per_s=sum(r.output_tokens for r in ok) * per_s,
        ttft=Latency.of(r.ttft_s for r in ok),
        tpot=Latency.of(r.tpot_s for r in ok if r.tpot_s is not None),
        itl=Latency.of(gap for r in ok for gap in r.itl_s),
        e2e=Latency.of(r.e2e_s for r in ok),
        server={phase: Latency.of(t[phase] for t in timed if phase in t) for phase in SERVER_PHASES},
    )
