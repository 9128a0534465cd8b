"""A fluid simulator of a disaggregated deployment, to drive the autoscaling policy as a pure function.

Ground truth is a prefill rate per replica and a decode step time a + b·batch; the
load is a function of time giving (arrival rate, prompt tokens, output tokens). Each
tick the prefill queue gains the arrivals' prompt tokens and loses what the pool
computes; the decode pool gains the arrivals and finishes sequences at
batch / (step time · output tokens) per replica. Replicas follow the policy's targets
after `startup_s`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pdserve.cluster.autoscaling import Observation, PolicySettings, PolicyState, decide
from pdserve.cluster.cost_model import StepSample, Workload

Load = Callable[[float], tuple[float, float, float]]  # time -> (requests/s, prompt tokens, output tokens)


@dataclass(frozen=True)
class Truth:
    prefill_tokens_per_s: float = 4000.0
    step_base_s: float = 0.020
    step_per_seq_s: float = 0.001
    max_running: int = 64


@dataclass
class Tick:
    time: float
    load: tuple[float, float, float]
    prefill: int  # running replicas
    decode: int
    target_prefill: int
    target_decode: int
    ttft_s: float
    tpot_s: float


@dataclass
class Run:
    ticks: list[Tick] = field(default_factory=list)
    decisions: list[tuple[float, str]] = field(default_factory=list)  # (time, text)

    def targets(self, pool: str) -> list[int]:
        return [getattr(t, f"target_{pool}") for t in self.ticks]

    def changes(self, pool: str, after: float = 0.0) -> int:
        sizes = [getattr(t, f"target_{pool}") for t in self.ticks if t.time >= after]
        return sum(a != b for a, b in zip(sizes, sizes[1:]))

    def first_time(self, pool: str, predicate: Callable[[int], bool], after: float = 0.0) -> float | None:
        return next((t.time for t in self.ticks if t.time >= after and predicate(getattr(t, f"target_{pool}"))), None)


def simulate(load: Load, settings: PolicySettings, duration_s: float, truth: Truth = Truth(),
             dt: float = 1.0, startup_s: float = 2.0) -> Run:
    """Run the policy every `settings.interval_s` against the simulated deployment for `duration_s`."""
    state = PolicyState.start(settings, 0.0)
    running = {"prefill": settings.prefill.min, "decode": settings.decode.min}
    pending: list[tuple[float, str, int]] = []  # (ready at, pool, size)
    queue_tokens, sequences = 0.0, 0.0
    samples: list[StepSample] = []
    measured_rate = 0.0
    last_policy = -settings.interval_s
    run = Run()
    now = 0.0
    while now < duration_s:
        rate, prompt, output = load(now)
        for ready, pool, size in [p for p in pending if p[0] <= now]:
            running[pool] = size
            pending.remove((ready, pool, size))
        # prefill: a queue of tokens served at the pool's rate
        capacity = running["prefill"] * truth.prefill_tokens_per_s * dt
        queue_tokens += rate * prompt * dt
        served = min(queue_tokens, capacity)
        queue_tokens -= served
        if served > 0:
            measured_rate = truth.prefill_tokens_per_s
        # decode: sequences arrive, each needs (output - 1) steps of its replica's batch
        sequences += rate * dt
        per_replica = min(sequences / running["decode"], truth.max_running)
        step_s = truth.step_base_s + truth.step_per_seq_s * max(per_replica, 1.0)
        if per_replica > 0:
            samples = (samples + [StepSample(per_replica, step_s)])[-64:]
            finished = running["decode"] * per_replica / (step_s * max(output - 1.0, 1.0)) * dt
            sequences = max(sequences - finished, 0.0)
        if now - last_policy >= settings.interval_s:
            last_policy = now
            observation = Observation(Workload(rate, prompt, output, queue_tokens, sequences), measured_rate,
                                      tuple(samples))
            state = decide(observation, state, settings, now)
            for d in state.decisions:
                run.decisions.append((now, d.text))
                pending.append((now + (startup_s if d.new > d.old else 0.0), d.pool, d.new))
        ttft = queue_tokens / (running["prefill"] * truth.prefill_tokens_per_s) + prompt / truth.prefill_tokens_per_s
        run.ticks.append(Tick(now, (rate, prompt, output), running["prefill"], running["decode"],
                              state.pools["prefill"].target, state.pools["decode"].target, ttft, step_s))
        now += dt
    return run
