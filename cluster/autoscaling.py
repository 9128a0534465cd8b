"""SLO-driven autoscaling of the prefill and decode pools, decided together in one step.

How a decision is made, every `interval_s`:
1. the replicas' `record_autoscaling_stats` (cluster/deployments.py) reach Ray Serve's
   controller; `PdserveAutoscalingPolicy` (Ray Serve's application-level policy,
   called with every deployment's `AutoscalingContext`) reads them back as each
   replica's typed `PrefillLoad` / `DecodeLoad` (engine/messages.py) and turns those
   into an `Observation`: the offered load and the measured prefill rate and decode step times;
2. `decide` (a pure function, tested with a simulator) asks the cost model
   (cluster/cost_model.py) for each pool: does the current size break its SLO?
   Then it wants the smallest size predicted within `up_headroom` × SLO. Is a smaller
   size predicted well inside it (`down_headroom` × SLO)? Then it wants that one.
   TTFT depends only on the prefill pool and TPOT only on the decode pool, so the
   pool whose SLO is at risk is the one that moves;
3. a wish is acted on once it has held for `upscale_delay_s` / `downscale_delay_s`
   (Ray Serve's own delays are set to 0: these are the only ones), inside the bounds;
4. the decision goes into the registry's notes (`pdserve status`, `/metrics`).
The band between the two headrooms is the hysteresis: under steady load no size is
both too small and comfortably large, so the pools do not flap.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from pdserve.cluster.config import PdserveConfig, load_config
from pdserve.cluster.cost_model import (
    DecodeProfile, PrefillProfile, Slo, StepSample, Workload, format_ms, predict_tpot, predict_ttft, smallest_holding,
)
from pdserve.cluster.registry import registry
from pdserve.engine.messages import DecodeLoad, PrefillLoad

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")
NOTES_KEY = "autoscaling"
_Load = TypeVar("_Load", PrefillLoad, DecodeLoad)


@dataclass(frozen=True)
class PoolBounds:
    min: int
    max: int


@dataclass(frozen=True)
class PolicySettings:
    slo: Slo
    prefill: PoolBounds
    decode: PoolBounds
    upscale_delay_s: float
    downscale_delay_s: float
    interval_s: float
    max_running: int
    up_headroom: float = 0.9  # scale up to a size predicted within this share of the SLO
    down_headroom: float = 0.6  # scale down only to a size predicted within this share

    @classmethod
    def from_config(cls, config: PdserveConfig) -> "PolicySettings":
        a = config.autoscaling
        return cls(Slo(config.slo.ttft_ms / 1000, config.slo.tpot_ms / 1000),
                   PoolBounds(config.prefill.replicas.min, config.prefill.replicas.max),
                   PoolBounds(config.decode.replicas.min, config.decode.replicas.max),
                   a.upscale_delay_s, a.downscale_delay_s, a.interval_s, max_running=config.decode.max_running)


@dataclass(frozen=True)
class Observation:
    """What the pools measured over the last window (0 where nothing was measured yet)."""

    workload: Workload  # arrivals reserved on the decode pool, lengths, the backlog, running, prefix hits
    prefill_tokens_per_s: float  # one prefill replica's rate on recent batches
    step_samples: tuple[StepSample, ...]  # decode (batch size, step time) pairs

    @property
    def is_idle(self) -> bool:
        """No new work: what is still running finishes (a leaving replica drains it)."""
        return self.workload.arrival_rate <= 0 and self.workload.queued_prompt_tokens <= 0


@dataclass(frozen=True)
class PoolState:
    target: int
    wish: int  # the size this pool has wanted since `wish_since`
    wish_since: float
    reason: str = ""  # why the wish, in words


@dataclass(frozen=True)
class Decision:
    """One pool's change of target, for the status and the decisions counter."""

    pool: str
    old: int
    new: int
    label: str  # the reason as a metric label: ttft_above_slo, tpot_within_slo, idle, ...
    text: str  # "decode: 2 → 3, predicted TPOT 71 ms > SLO 60 ms at 38 running sequences"


@dataclass(frozen=True)
class PolicyState:
    pools: dict[str, PoolState]
    decisions: tuple[Decision, ...] = ()  # made at the last step

    @classmethod
    def start(cls, settings: PolicySettings, now: float, prefill: int | None = None,
              decode: int | None = None) -> "PolicyState":
        sizes = {"prefill": prefill or settings.prefill.min, "decode": decode or settings.decode.min}
        return cls({pool: PoolState(n, n, now) for pool, n in sizes.items()})


def decide(observation: Observation, state: PolicyState, settings: PolicySettings, now: float) -> PolicyState:
    """Both pools' next targets: the pure heart of the policy."""
    pools, decisions = {}, []
    for pool in POOLS:
        current = state.pools[pool]
        wish, label, why = _wish(pool, observation, current.target, settings)
        since = current.wish_since if wish == current.wish else now
        delay = settings.upscale_delay_s if wish > current.target else settings.downscale_delay_s
        target = current.target
        if wish != current.target and now - since >= delay:
            target = wish
            decisions.append(Decision(pool, current.target, wish, label, f"{pool}: {current.target} → {wish}, {why}"))
        pools[pool] = PoolState(target, wish, since, why)
    return PolicyState(pools, tuple(decisions))


def _wish(pool: str, observation: Observation, target: int, settings: PolicySettings) -> tuple[int, str, str]:
    """(the size this pool wants, a reason label, the reason in words)."""
    bounds: PoolBounds = getattr(settings, pool)
    if observation.is_idle:
        return bounds.min, "idle", "no load"
    workload = observation.workload
    if pool == "prefill":
        if observation.prefill_tokens_per_s <= 0:
            return target, "unmeasured", "no prefill rate measured yet"
        profile = PrefillProfile(observation.prefill_tokens_per_s)
        latency = lambda n: predict_ttft(workload, n, profile)[0]  # noqa: E731
        slo, metric = settings.slo.ttft_s, "TTFT"
        cached = f", {workload.prefix_hit_rate:.0%} from the prefix cache" if workload.prefix_hit_rate else ""
        load = lambda n: f"{workload.arrival_rate:.1f} requests/s of {workload.prompt_tokens:.0f} prompt tokens{cached}"  # noqa: E731
    else:
        if not observation.step_samples:
            return target, "unmeasured", "no decode steps measured yet"
        profile = DecodeProfile.fit(observation.step_samples, settings.max_running)
        latency = lambda n: predict_tpot(workload, n, profile)[0]  # noqa: E731
        slo, metric = settings.slo.tpot_s, "TPOT"
        load = lambda n: _decode_load(workload, n, profile)  # noqa: E731
    now_latency = latency(target)
    if now_latency > slo and target < bounds.max:
        wish = smallest_holding(lambda n: latency(n) <= settings.up_headroom * slo, max(target + 1, bounds.min),
                                bounds.max)
        return wish, f"{metric.lower()}_above_slo", (
            f"predicted {metric} {format_ms(now_latency)} > SLO {format_ms(slo)} at {load(target)}")
    smaller = smallest_holding(lambda n: latency(n) <= settings.down_headroom * slo, bounds.min, target)
    if smaller < target:
        return smaller, f"{metric.lower()}_within_slo", (
            f"predicted {metric} {format_ms(latency(smaller))} with {smaller} within {settings.down_headroom:.0%} of "
            f"SLO {format_ms(slo)} at {load(smaller)}")
    clamped = min(max(target, bounds.min), bounds.max)
    return clamped, "holding", (
        f"predicted {metric} {format_ms(now_latency)} against SLO {format_ms(slo)} at {load(target)}")


def _decode_load(workload: Workload, num_decode: int, profile: DecodeProfile) -> str:
    running = predict_tpot(workload, num_decode, profile)[1] * num_decode
    if math.isinf(running):
        return f"{workload.arrival_rate:.1f} requests/s of {workload.output_tokens:.0f} output tokens (saturated)"
    return f"{max(running, workload.running_sequences):.0f} running sequences"


# ---- Ray Serve's application-level policy -------------------------------------------


def pool_loads(cls: type[_Load], metrics: dict[str, dict[str, float]]) -> list[_Load]:
    """Each replica's typed load from a pool's {metric: {replica: value}} (Ray Serve aggregates every
    metric on its own); LoadReportError where a replica's report lacks a field."""
    replicas = sorted({replica for per_replica in metrics.values() for replica in per_replica})
    return [cls.from_dict({**{name: per_replica[replica] for name, per_replica in metrics.items() if replica in per_replica},
                           "replica_id": replica}) for replica in replicas]


def observe(prefill: Sequence[PrefillLoad], decode: Sequence[DecodeLoad],
            samples: dict[str, list[tuple[float, float]]]) -> Observation:
    """An Observation from each pool's replica loads and decode's raw (batch, step time) pairs."""
    arrival_rate = sum(d.arrivals_per_s for d in decode)
    prompt_tokens = _weighted_mean([(d.prompt_tokens_mean, d.arrivals_per_s) for d in decode])
    generated_per_s = sum(d.tokens_per_s for d in decode)
    output_tokens = generated_per_s / arrival_rate + 1.0 if arrival_rate > 0 else 0.0  # the first comes from prefill
    rates = [p.tokens_per_s for p in prefill if p.tokens_per_s > 0]
    hits = [p.prefix_hit_rate for p in prefill]
    pairs = [StepSample(batch, step) for series in samples.values() for batch, step in series if batch > 0 and step > 0]
    workload = Workload(
        arrival_rate=arrival_rate, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        queued_prompt_tokens=sum(p.queued_tokens for p in prefill),
        running_sequences=sum(d.num_running + d.num_waiting for d in decode),
        prefix_hit_rate=sum(hits) / len(hits) if hits else 0.0)
    return Observation(workload, sum(rates) / len(rates) if rates else 0.0, tuple(pairs[-64:]))


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """The mean of (value, weight) pairs by weight; the plain mean where no weight is positive."""
    total = sum(weight for _, weight in pairs)
    if total <= 0:
        return sum(value for value, _ in pairs) / len(pairs) if pairs else 0.0
    return sum(value * weight for value, weight in pairs) / total


class PdserveAutoscalingPolicy:
    """Ray Serve's application-level policy: every deployment's context in, every pool's replica count out."""

    def __init__(self, config: dict[str, Any]):
        self.settings = PolicySettings.from_config(load_config(config))
        self.state: PolicyState | None = None
        self._last_step = -math.inf
        self._counts: dict[str, int] = {}
        self._last_decision = ""
        self._registry = None

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        by_pool = {ctx.deployment_name: (dep, ctx) for dep, ctx in contexts.items() if ctx.deployment_name in POOLS}
        now = time.time()
        if self.state is None:
            self.state = PolicyState.start(self.settings, now, *(by_pool[p][1].target_num_replicas if p in by_pool else None
                                                               for p in POOLS))
        if now - self._last_step >= self.settings.interval_s:
            self._last_step = now
            self.state = decide(self._observe(by_pool), self.state, self.settings, now)
            self._publish(by_pool)
        return {dep: self.state.pools[pool].target for pool, (dep, _) in by_pool.items()}, {}

    def _observe(self, by_pool: dict[str, tuple[Any, Any]]) -> Observation:
        metrics: dict[str, dict[str, dict[str, float]]] = {pool: {} for pool in POOLS}
        samples: dict[str, list[tuple[float, float]]] = {}
        for pool, (_, ctx) in by_pool.items():
            metrics[pool] = {name: {str(r): v for r, v in per_replica.items()}
                             for name, per_replica in (ctx.aggregated_metrics or {}).items()}
        if "decode" in by_pool:
            raw = by_pool["decode"][1].raw_metrics or {}
            batches, steps = raw.get("batch_size", {}), raw.get("step_time_s", {})
            for replica, series in batches.items():
                step_series = steps.get(replica, [])
                samples[str(replica)] = [(b.value, s.value) for b, s in zip(series, step_series)]
        return observe(pool_loads(PrefillLoad, metrics["prefill"]), pool_loads(DecodeLoad, metrics["decode"]), samples)

    def _publish(self, by_pool: dict[str, tuple[Any, Any]]) -> None:
        """The state in the registry's notes, for `pdserve status` and /metrics (fire and forget)."""
        for d in self.state.decisions:
            key = f"{d.pool}/{'up' if d.new > d.old else 'down'}/{d.label}"
            self._counts[key] = self._counts.get(key, 0) + 1
            self._last_decision = d.text
            log.info("pdserve autoscaling: %s", d.text)
        pools = {pool: {"replicas": ctx.current_num_replicas, "target": self.state.pools[pool].target,
                        "reason": self.state.pools[pool].reason} for pool, (_, ctx) in by_pool.items()}
        note = {"pools": pools, "last_decision": self._last_decision, "decisions": dict(self._counts),
                "slo": {"ttft_ms": self.settings.slo.ttft_s * 1000, "tpot_ms": self.settings.slo.tpot_s * 1000}}
        try:
            if self._registry is None:
                self._registry = registry()
            self._registry.note.remote(NOTES_KEY, note)
        except Exception:  # the registry restarting must not stop the scaling
            self._registry = None


def is_autoscaled(config: PdserveConfig) -> bool:
    """Whether the policy sizes the pools: a MIN:MAX range on either pool (never for a colocated pool)."""
    return not config.is_colocated and (config.prefill.replicas.is_autoscaled or config.decode.replicas.is_autoscaled)


def serve_autoscaling_config(config: PdserveConfig, pool: str) -> dict[str, Any] | None:
    """A pool's Ray Serve `autoscaling_config`; both pools get one when either autoscales, so the policy sees both."""
    if not is_autoscaled(config):
        return None
    replicas = getattr(config, pool).replicas
    interval = config.autoscaling.interval_s
    return {"min_replicas": replicas.min, "max_replicas": replicas.max, "initial_replicas": replicas.min,
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,  # the policy applies pdserve's own delays
            "metrics_interval_s": interval, "look_back_period_s": 3 * interval}


def serve_application_policy(config: PdserveConfig) -> dict[str, Any]:
    """The application's `autoscaling_policy` entry of a Serve config."""
    return {"policy_function": f"{__name__}:PdserveAutoscalingPolicy", "policy_kwargs": {"config": config.to_dict()}}
