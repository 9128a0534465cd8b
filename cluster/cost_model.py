"""Predicted TTFT and TPOT of a disaggregated deployment, from what its replicas measure.

One model, two users: the autoscaling policy (`cluster/autoscaling.py`) sizes the
pools with it and `pdserve diagnose` explains a deployment with it. Pure Python,
no Ray, no offline profiling: every number comes from the replicas' reports.

    profiles = Profiles(PrefillProfile(tokens_per_s=9000, handoff_s=0.002),
                        DecodeProfile.fit([StepSample(1, 0.010), StepSample(16, 0.025)], max_running=64))
    workload = Workload(arrival_rate=4.0, prompt_tokens=900, output_tokens=200)
    predict(workload, num_prefill=1, num_decode=2, profiles)  # -> Prediction(ttft_s, tpot_s, ...)

The model, phase by phase (both are approximations, chosen to be explainable):
- TTFT (prefill pool, depends only on `num_prefill`): queue wait + the prefill
  time of a typical prompt (P / tokens_per_s) + the KV handoff, where
  P = prompt_tokens·(1 - prefix_hit_rate) is what a replica computes of it (the
  prefix cache's hits cost no compute, and the measured rate counts none).
  Each replica is an M/D/1 queue taking 1/num_prefill of the arrivals with a
  deterministic service time S (a typical prompt): utilisation
  rho = arrival_rate·P / (num_prefill·tokens_per_s) and mean wait
  rho·S / (2(1 - rho)). A backlog measured now (`queued_prompt_tokens`) drains at
  the pool's rate; the wait is the larger of the two (the backlog *is* the
  steady queue when the load is steady; it dominates right after a surge).
  rho >= 1: the queue grows without bound and TTFT is infinite.
- TPOT (decode pool, depends only on `num_decode`): the step time at the batch
  each replica would run, step(n) = a + b·n + c·n·context on the GPU, plus the
  host time per step the GPU did not hide, h(n) = h0 + h1·n (both measured: the
  replicas time their GPU's busy time per step beside the step's wall time,
  `DecodeProfile.measured`). The batch comes from
  Little's law: each replica produces n / step(n) tokens a second and must
  produce arrival_rate·output_tokens / num_decode, so
  n = k·a / (1 - k·(b + c·context)) with k = arrival_rate·output_tokens / num_decode.
  No solution, or n above `max_running`: the pool is saturated, TPOT infinite.
  Running sequences measured now are a floor on the total (spread evenly).
Every replica's GPUs are counted (`num_gpus` of each profile: a TP-2 decode replica
is 2): a prediction says how many GPUs its sizes hold, so splits compare by goodput
per GPU and the autoscaler keeps to a GPU budget.
The SLO checks use `headroom`: a size holds the SLO when its prediction is at
most headroom × SLO (the policy scales up at 1.0 and down only well inside, at a
smaller headroom, which is its hysteresis).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class PrefillProfile:
    """A prefill replica as measured: prompt tokens per second on recent batches."""

    tokens_per_s: float
    handoff_s: float = 0.0  # KV transfer time left after the last layer (measured per request)
    num_gpus: float = 1.0  # GPUs one replica holds (its TP ranks)


@dataclass(frozen=True)
class StepSample:
    """One decode replica's report: mean step time at a mean batch size (and mean context)."""

    batch_size: float
    step_time_s: float
    context_tokens: float = 0.0


@dataclass(frozen=True)
class DecodeProfile:
    """A decode replica's step time: on the GPU base_s + per_seq_s·n + per_seq_token_s·n·context,
    plus the host's exposed time host_base_s + host_per_seq_s·n."""

    base_s: float
    per_seq_s: float = 0.0
    per_seq_token_s: float = 0.0
    max_running: int = 64
    host_base_s: float = 0.0
    host_per_seq_s: float = 0.0
    num_gpus: float = 1.0  # GPUs one replica holds (its TP ranks)

    def step_time(self, batch_size: float, context_tokens: float = 0.0) -> float:
        """Seconds one decode step takes at this batch size and mean context (what TPOT sees)."""
        return self.gpu_step_time(batch_size, context_tokens) + self.host_step_time(batch_size)

    def gpu_step_time(self, batch_size: float, context_tokens: float = 0.0) -> float:
        """The GPU's busy time of one step."""
        return self.base_s + batch_size * (self.per_seq_s + self.per_seq_token_s * context_tokens)

    def host_step_time(self, batch_size: float) -> float:
        """Host time per step the GPU did not hide (0 where it was not measured)."""
        return self.host_base_s + self.host_per_seq_s * batch_size

    @property
    def slope_s(self) -> float:
        """Seconds a running sequence adds to a step at no context, GPU and host together."""
        return self.per_seq_s + self.host_per_seq_s

    @classmethod
    def measured(cls, gpu: Sequence[StepSample], host: Sequence[StepSample], max_running: int = 64,
                 num_gpus: float = 1.0) -> "DecodeProfile":
        """The GPU part fitted from (batch, GPU busy time) samples, the engine's own steps timed at start
        among them (so a run at one loaded batch size is never extrapolated alone); the host part from
        (batch, wall - busy) samples, a constant when they hold one batch size."""
        fitted = cls.fit(gpu, max_running, num_gpus)
        usable = [s for s in host if s.batch_size > 0 and s.step_time_s > 0]
        if not usable:
            return fitted
        h = cls.fit([StepSample(s.batch_size, s.step_time_s) for s in usable])
        return dataclasses.replace(fitted, host_base_s=h.base_s, host_per_seq_s=h.per_seq_s)

    @classmethod
    def fit(cls, samples: Sequence[StepSample], max_running: int = 64, num_gpus: float = 1.0) -> "DecodeProfile":
        """Least squares over the samples; terms the samples cannot pin down (or that come out negative) are dropped."""
        usable = [s for s in samples if s.batch_size > 0 and s.step_time_s > 0]
        if not usable:
            raise ValueError("no decode step samples to fit")
        rows = [(1.0, s.batch_size, s.batch_size * s.context_tokens) for s in usable]
        targets = [s.step_time_s for s in usable]
        for terms in ((0, 1, 2), (0, 1), (0,)):
            coefficients = _least_squares([[row[t] for t in terms] for row in rows], targets)
            if coefficients is not None and all(c >= 0 for c in coefficients):
                full = [0.0, 0.0, 0.0]
                for term, value in zip(terms, coefficients):
                    full[term] = value
                return cls(full[0], full[1], full[2], max_running, num_gpus=num_gpus)
        # one batch size only and a negative slope is impossible: a constant step time
        return cls(sum(targets) / len(targets), 0.0, 0.0, max_running, num_gpus=num_gpus)


@dataclass(frozen=True)
class Profiles:
    prefill: PrefillProfile
    decode: DecodeProfile


@dataclass(frozen=True)
class Workload:
    """The load offered to the deployment (means over a recent window)."""

    arrival_rate: float  # requests per second
    prompt_tokens: float  # mean prompt length
    output_tokens: float  # mean generated tokens per request (the first comes from prefill)
    queued_prompt_tokens: float = 0.0  # prompt tokens waiting in the prefill pool now
    running_sequences: float = 0.0  # sequences held by the decode pool now
    prefix_hit_rate: float = 0.0  # share of prompt tokens whose KV the prefill pool's prefix cache holds

    @property
    def computed_prompt_tokens(self) -> float:
        """What a prefill replica computes of a mean prompt: its measured rate counts only these."""
        return self.prompt_tokens * (1.0 - self.prefix_hit_rate)


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Prediction:
    """What a deployment of `num_prefill` + `num_decode` replicas would show under the workload."""

    num_prefill: int
    num_decode: int
    ttft_s: float  # math.inf: the prefill pool cannot keep up
    tpot_s: float  # math.inf: the decode pool cannot keep up
    prefill_utilisation: float  # arrivals' prompt tokens over the pool's rate
    running_per_decode: float  # sequences in each decode replica's batch
    bottleneck: str  # "prefill" | "decode": the phase closer to (or further past) its SLO, or slower per request
    num_gpus: float = 0.0  # what both pools hold

    def holds(self, slo: Slo, headroom: float = 1.0) -> bool:
        return self.ttft_s <= headroom * slo.ttft_s and self.tpot_s <= headroom * slo.tpot_s


def predict_ttft(workload: Workload, num_prefill: int, prefill: PrefillProfile) -> tuple[float, float]:
    """(TTFT seconds, utilisation) of a prefill pool of `num_prefill` replicas."""
    if num_prefill <= 0 or prefill.tokens_per_s <= 0:
        return math.inf, math.inf
    capacity = num_prefill * prefill.tokens_per_s
    utilisation = workload.arrival_rate * workload.computed_prompt_tokens / capacity
    service_s = workload.computed_prompt_tokens / prefill.tokens_per_s
    backlog_s = workload.queued_prompt_tokens / capacity
    if utilisation >= 1.0:
        return math.inf, utilisation
    steady_wait_s = utilisation * service_s / (2.0 * (1.0 - utilisation))  # M/D/1 mean wait
    return max(backlog_s, steady_wait_s) + service_s + prefill.handoff_s, utilisation


def predict_tpot(workload: Workload, num_decode: int, decode: DecodeProfile) -> tuple[float, float]:
    """(TPOT seconds, running sequences per replica) of a decode pool of `num_decode` replicas."""
    if num_decode <= 0:
        return math.inf, math.inf
    context = workload.prompt_tokens + workload.output_tokens / 2.0  # mean over a sequence's life
    tokens_per_s = workload.arrival_rate * max(workload.output_tokens - 1.0, 0.0) / num_decode
    slope = decode.slope_s + decode.per_seq_token_s * context
    denominator = 1.0 - tokens_per_s * slope
    if denominator <= 0:
        return math.inf, math.inf
    little = tokens_per_s * (decode.base_s + decode.host_base_s) / denominator  # n = k·step(n), solved for n
    running = max(little, workload.running_sequences / num_decode)
    if running > decode.max_running:
        return math.inf, running
    return decode.step_time(max(running, 1.0), context), running


def predict(workload: Workload, num_prefill: int, num_decode: int, profiles: Profiles, slo: Slo | None = None) -> Prediction:
    """Predicted TTFT and TPOT of these pool sizes under the workload."""
    ttft_s, utilisation = predict_ttft(workload, num_prefill, profiles.prefill)
    tpot_s, running = predict_tpot(workload, num_decode, profiles.decode)
    if slo is not None:
        is_prefill = ttft_s / slo.ttft_s >= tpot_s / slo.tpot_s
    else:  # no SLO: the phase that takes longer per request
        is_prefill = ttft_s >= tpot_s * max(workload.output_tokens - 1.0, 1.0)
    return Prediction(num_prefill, num_decode, ttft_s, tpot_s, utilisation, running,
                      "prefill" if is_prefill else "decode", num_gpus(num_prefill, num_decode, profiles))


def num_gpus(num_prefill: int, num_decode: int, profiles: Profiles) -> float:
    """The GPUs a deployment of these pool sizes holds."""
    return num_prefill * profiles.prefill.num_gpus + num_decode * profiles.decode.num_gpus


def format_ms(seconds: float) -> str:
    """A predicted latency in words: "71 ms", or "unbounded" for a pool that cannot keep up."""
    return "unbounded" if math.isinf(seconds) else f"{seconds * 1000:.0f} ms"


def smallest_holding(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest pool size in [low, high] for which `holds`; `high` when none does."""
    return next((n for n in range(low, high + 1) if holds(n)), high)


def _least_squares(rows: list[list[float]], targets: list[float]) -> list[float] | None:
    """Solve the normal equations by Gaussian elimination; None when the samples do not pin the terms down."""
    size = len(rows[0])
    if len(rows) < size:
        return None
    matrix = [[sum(r[i] * r[j] for r in rows) for j in range(size)] + [sum(r[i] * t for r, t in zip(rows, targets))]
              for i in range(size)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(matrix[r][col]))
        scale = max(abs(matrix[r][col]) for r in range(size)) or 1.0
        if abs(matrix[pivot][col]) <= 1e-9 * scale:
            return None
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        for r in range(size):
            if r != col:
                factor = matrix[r][col] / matrix[col][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[col])]
    return [matrix[i][size] / matrix[i][i] for i in range(size)]
