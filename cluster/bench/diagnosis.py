"""What `pdserve diagnose` finds: the load points measured, the splits predicted, the verdict."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import cost_model as cm
from .stats import Slo

MAX_REPLICAS = 8  # splits searched: p + d <= MAX_REPLICAS


@dataclass(frozen=True)
class LoadPoint:
    """One run, measured: its load, each phase against its SLO, and where TTFT went."""

    offered_rps: float | None
    throughput_rps: float
    goodput_rps: float
    ttft_p90_s: float  # as the client saw it
    prefill_phase_p90_s: float  # the part of TTFT the prefill pool owns: queue + prefill + KV handoff
    tpot_p90_s: float  # 0 when every answer had one token
    queue_s: float  # means, from the server's timings
    prefill_s: float
    kv_transfer_s: float
    router_s: float  # the rest of the server's TTFT: routing, the decode reservation, relaying
    frontend_s: float  # the client's TTFT beyond the server's: HTTP proxy, network
    prefill_utilisation: float  # arrivals' prompt tokens over the prefill pool's measured rate
    decode_batch: float  # mean running batch per decode replica while the run went
    prefill_ratio: float  # prefill_phase_p90_s / TTFT SLO
    decode_ratio: float  # tpot_p90_s / TPOT SLO
    bottleneck: str  # "prefill" | "decode": the larger ratio


@dataclass(frozen=True)
class Split:
    """A prefill:decode split and the cost model's highest rate holding both SLOs there."""

    num_prefill: int
    num_decode: int
    max_goodput_rps: float

    @property
    def per_replica_rps(self) -> float:
        return self.max_goodput_rps / (self.num_prefill + self.num_decode)


@dataclass(frozen=True)
class Diagnosis:
    deployment: str
    colocated: bool
    num_prefill: int
    num_decode: int
    slo: Slo
    workload: cm.Workload  # mean prompt and output lengths (arrival rate: the highest throughput measured)
    profiles: cm.Profiles
    points: list[LoadPoint]
    bottleneck: str
    broken_at_rps: float | None  # lowest measured throughput where an SLO broke
    model_bottleneck: str  # the cost model's, at the current sizes and the highest throughput measured
    current: Split  # the sizes deployed (colocated: as 1 prefill + 1 decode)
    baseline: Split  # the current ratio scaled up to about MAX_REPLICAS
    best: Split
    splits: list[Split]
    hardware: list[str]

    @property
    def max_replicas(self) -> int:
        """The most replicas a searched split has."""
        return max(s.num_prefill + s.num_decode for s in self.splits)

    @property
    def gain(self) -> float:
        """Goodput per replica of the best split over the current ratio's, minus one (inf from zero)."""
        if self.baseline.per_replica_rps <= 0:
            return math.inf if self.best.per_replica_rps > 0 else 0.0
        return self.best.per_replica_rps / self.baseline.per_replica_rps - 1
