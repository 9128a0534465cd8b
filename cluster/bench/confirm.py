"""`pdserve diagnose --confirm`: offer the deployment the rate the cost model says it holds, and measure.

Every split diagnose recommends is a prediction of the same model, so the model is
checked where it can be without redeploying: at the deployment's own sizes. A
Poisson run at `current.max_goodput_rps` (the highest rate the model says keeps
both SLOs there); as DistServe defines goodput, the rate holds when at least
`CONFIRMED_SHARE` of its requests meet both SLOs. Two things would make that pass for
the wrong reason, so neither may: a run too short for a queue to form (its arrivals last
at least `STEADY_LIVES` predicted request lives), and a client too busy to send on time
(its event loop lagging: the server then saw less than the rate). A lagging client's run
is offered again with twice the client processes, up to this machine's CPUs. A colocated
deployment is not confirmable: the model predicts prefill:decode splits.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from .. import cost_model as cm
from .diagnosis import Diagnosis
from .run import BenchConfig, run_bench
from .verdict import CLIENT_LAG_S

CONFIRMED_SHARE = 0.9
STEADY_LIVES = 3  # arrivals outlast a request's predicted life this many times (a shorter run ends before its queue forms)


@dataclass(frozen=True)
class Confirmation:
    offered_rps: float  # the model's max goodput at the deployment's sizes
    slo_attainment: float  # measured: the share of the offered requests that met both SLOs
    num_requests: int
    throughput_rps: float  # finished requests over the run, its drain included
    ttft_p90_s: float
    tpot_p90_s: float
    num_failed: int
    client_lag_s: float  # p90 of the bench client's own loop lag: a busy client measures itself
    processes: int  # client processes that offered the load

    @property
    def client_kept_up(self) -> bool:
        return self.client_lag_s < CLIENT_LAG_S

    @property
    def confirmed(self) -> bool:
        return self.slo_attainment >= CONFIRMED_SHARE and self.client_kept_up

    @property
    def goodput_rps(self) -> float:
        """DistServe's: the offered rate times the share of it served within both SLOs."""
        return self.offered_rps * self.slo_attainment

    def lines(self) -> list[str]:
        word = "confirmed" if self.confirmed else "NOT confirmed"
        return [f"Confirm: offered the predicted {self.offered_rps:.2f} req/s ({self.num_requests} requests); "
                f"{self.slo_attainment:.0%} met both SLOs (goodput {self.goodput_rps:.2f} req/s; TTFT p90 "
                f"{1e3 * self.ttft_p90_s:.0f} ms, TPOT p90 {1e3 * self.tpot_p90_s:.1f} ms, {self.num_failed} failed, "
                f"throughput with the drain {self.throughput_rps:.2f} req/s): the model is {word} here "
                f"(at least {CONFIRMED_SHARE:.0%} of the requests within both SLOs, sent on time)."] + self._busy_client()

    def _busy_client(self) -> list[str]:
        if self.client_kept_up:
            return []
        return [f"  The client was the limit, not the server: its loop lagged {1e3 * self.client_lag_s:.0f} ms at p90 "
                f"with {self.processes} client process(es), as many as this machine's CPUs allow; confirm from a "
                "machine with more."]


def unconfirmable(diagnosis: Diagnosis) -> str:
    """Why `confirm` cannot check this diagnosis ('' when it can)."""
    if diagnosis.colocated:
        return "Confirm: not run: the deployment is colocated, and the model predicts prefill:decode splits."
    if diagnosis.current.max_goodput_rps <= 0:
        return "Confirm: not run: the model says the current sizes hold no rate within both SLOs."
    return ""


def more_processes(checked: Confirmation, cpus: int) -> int | None:
    """The client processes to offer the rate again with; None when the run stands (the client sent on
    time, or twice the processes would outnumber the CPUs)."""
    if checked.client_kept_up or 2 * checked.processes > cpus:
        return None
    return 2 * checked.processes


def steady_requests(diagnosis: Diagnosis, asked: int) -> int:
    """At least `asked`; more when the rate's arrivals would not outlast `STEADY_LIVES` predicted request lives."""
    rate = diagnosis.current.max_goodput_rps
    workload = dataclasses.replace(diagnosis.workload, arrival_rate=rate, queued_prompt_tokens=0.0, running_sequences=0.0)
    at = cm.predict(workload, max(diagnosis.num_prefill, 1), diagnosis.num_decode, diagnosis.profiles, diagnosis.slo)
    life_s = at.ttft_s + at.tpot_s * max(workload.output_tokens - 1.0, 0.0)
    return max(asked, math.ceil(rate * STEADY_LIVES * life_s)) if math.isfinite(life_s) else asked


async def confirm(diagnosis: Diagnosis, config: BenchConfig) -> Confirmation:
    """Offer the deployment as it is the model's max goodput, long enough for a steady state; again with more
    client processes while the client was the limit."""
    config = dataclasses.replace(config, num_requests=steady_requests(diagnosis, config.num_requests))
    checked = await _offer(diagnosis, config)
    while (processes := more_processes(checked, os.cpu_count() or 1)) is not None:
        checked = await _offer(diagnosis, dataclasses.replace(config, processes=processes))
    return checked


async def _offer(diagnosis: Diagnosis, config: BenchConfig) -> Confirmation:
    """One Poisson run of `config`'s workload at the model's max goodput for the deployment as it is."""
    rate = diagnosis.current.max_goodput_rps
    result = await run_bench(dataclasses.replace(config, rates=(rate,), concurrency=None, warmup=0))
    run = result.runs[-1]
    s = run.summary(diagnosis.slo)
    return Confirmation(rate, s.slo_attainment, s.num_requests, s.throughput_rps, s.ttft.p90 or 0.0,
                        s.tpot.p90 or 0.0, s.num_failed, run.client_lag_s, config.processes)
