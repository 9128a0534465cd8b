"""What `pdserve diagnose` finds: the load points measured, the splits predicted, the verdict."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import cost_model as cm
from .stats import Slo

MAX_REPLICAS = 8  # splits searched: p + d <= MAX_REPLICAS
HOST_PARTS = {
    "decode loop": "the decode replica's host work per step (building the step's inputs, emitting tokens, locks)",
    "kernel launches": "Python launching the decode step's kernels one by one (no CUDA graph at this batch size)",
    "prefill loop": "the prefill replica's host work between batches while prompts wait",
    "prefill launches": "Python launching a prefill batch's kernels one by one (no CUDA graph for its shape)",
    "router": "the router: routing, the decode reservation and relaying the stream",
    "front end": "the router's HTTP/gRPC serving of the stream and the network to the client",
    "client": "the client itself: its event loop lagged while the server had nothing waiting",
}


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
    stake_ratio: float  # the phase at stake's ratio: prefill's, the client's TTFT's (when it went outside), decode's
    server_tpot_p90_s: float  # TPOT as the router saw it (0: no server timings)
    replicas: ReplicaTimes  # what the replicas' step clocks measured while the run went
    client_lag_s: float  # p90 of the bench client's own event-loop lag
    phase: str  # "prefill" | "decode": the phase further past (or closer to) its SLO
    bottleneck: str  # "prefill" | "decode" (that phase's GPU was busy) | "host"
    host_part: str  # with "host": one of HOST_PARTS
    host_why: str  # with "host": the measurement that names the part


@dataclass(frozen=True)
class ReplicaTimes:
    """Means over a run's pool samples of what the replicas' step clocks reported (None: not reported)."""

    decode_step_s: float | None = None  # wall time of a step (the period)
    decode_gpu_step_s: float | None = None  # the GPU's busy time of a step
    decode_launch_s: float | None = None  # host time launching a step (CUDA only, else 0)
    decode_idle_share: float | None = None  # over samples with sequences running
    decode_waiting: float = 0.0  # sequences reserved or admitted but not running
    prefill_idle_share: float | None = None  # over samples with prompts queued (colocated: the decode replica's)
    prefill_queued: float = 0.0  # prompts waiting
    prefill_gpu_batch_s: float | None = None  # the GPU's busy time of a batch (a prefill pool's; CUDA only)
    prefill_launch_s: float | None = None  # host time launching a batch (a prefill pool's; CUDA only)


@dataclass(frozen=True)
class Split:
    """A prefill:decode split and the cost model's highest rate holding both SLOs there."""

    num_prefill: int
    num_decode: int
    max_goodput_rps: float
    num_gpus: float  # what the split's replicas hold (a TP replica: several)

    @property
    def per_gpu_rps(self) -> float:
        return self.max_goodput_rps / self.num_gpus if self.num_gpus > 0 else 0.0


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
    bottleneck: str  # "prefill" | "decode" | "host"
    host_part: str  # with "host": one of HOST_PARTS
    phase: str  # the phase whose SLO broke first (or came closest)
    broken_at_rps: float | None  # lowest measured throughput where an SLO broke
    model_bottleneck: str  # the cost model's, at the current sizes and the highest throughput measured
    current: Split  # the sizes deployed (colocated: as 1 prefill + 1 decode)
    baseline: Split  # the current ratio scaled up to about MAX_REPLICAS
    best: Split
    splits: list[Split]
    hardware: list[str]
    fit: StepFit
    alone: AloneRequest | None  # a request measured with no other in flight, if the bench had one

    @property
    def max_replicas(self) -> int:
        """The most replicas a searched split has."""
        return max(s.num_prefill + s.num_decode for s in self.splits)

    @property
    def gain(self) -> float:
        """Goodput per GPU of the best split over the current ratio's, minus one (inf from zero)."""
        if self.baseline.per_gpu_rps <= 0:
            return math.inf if self.best.per_gpu_rps > 0 else 0.0
        return self.best.per_gpu_rps / self.baseline.per_gpu_rps - 1


@dataclass(frozen=True)
class StepFit:
    """Where the decode step-time model came from, and the deployment's real limits."""

    num_points: int  # (batch, GPU time) points across the run, one per batch size
    num_host_points: int  # (batch, host time) points: one alone makes the host's time a constant
    batch_sizes: tuple[float, ...]  # those points' batch sizes
    anchors: tuple[tuple[int, float], ...]  # the engine's own (batch, seconds) timed at replica start
    max_running: int | None  # decode.max_running as the replicas report it (None: not reported)
    kv_blocks: int | None  # KV blocks of one decode replica
    kv_block_size: int | None
    max_by_kv: int | None  # sequences of this workload's length the KV blocks hold


@dataclass(frozen=True)
class AloneRequest:
    """Medians over the requests that had the server to themselves."""

    count: int
    ttft_s: float
    tpot_s: float | None
