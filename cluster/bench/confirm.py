"""`pdserve diagnose --confirm`: offer the deployment the rate the cost model says it holds, and measure.

Every split diagnose recommends is a prediction of the same model, so the model is
checked where it can be without redeploying: at the deployment's own sizes. A
Poisson run at `current.max_goodput_rps` (the highest rate the model says keeps
both SLOs there); the prediction is confirmed when the measured goodput (requests
meeting both SLOs, per second) is at least `CONFIRMED_SHARE` of that rate. A run that
fell short while the client itself was the limit (its event loop lagging) says nothing
of the server: it is run again with twice the client processes, up to this machine's CPUs. A
colocated deployment is not confirmable: the model predicts prefill:decode splits.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .diagnosis import Diagnosis
from .run import BenchConfig, run_bench
from .verdict import CLIENT_LAG_S

CONFIRMED_SHARE = 0.9


@dataclass(frozen=True)
class Confirmation:
    offered_rps: float  # the model's max goodput at the deployment's sizes
    goodput_rps: float  # measured: requests within both SLOs, per second
    throughput_rps: float
    ttft_p90_s: float
    tpot_p90_s: float
    num_failed: int
    client_lag_s: float  # p90 of the bench client's own loop lag: a busy client measures itself
    processes: int  # client processes that offered the load

    @property
    def confirmed(self) -> bool:
        return self.goodput_rps >= CONFIRMED_SHARE * self.offered_rps

    def lines(self) -> list[str]:
        word = "confirmed" if self.confirmed else "NOT confirmed"
        return [f"Confirm: offered the predicted {self.offered_rps:.2f} req/s; measured goodput {self.goodput_rps:.2f} "
                f"req/s (throughput {self.throughput_rps:.2f}, TTFT p90 {1e3 * self.ttft_p90_s:.0f} ms, TPOT p90 "
                f"{1e3 * self.tpot_p90_s:.1f} ms, {self.num_failed} failed): the model is {word} here "
                f"(at least {CONFIRMED_SHARE:.0%} of the rate within both SLOs)."] + self._busy_client()

    def _busy_client(self) -> list[str]:
        if self.confirmed or self.client_lag_s < CLIENT_LAG_S:
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
    """The client processes to offer the rate again with; None when the run stands (it held, the client
    was not the limit, or twice the processes would outnumber the CPUs)."""
    if checked.confirmed or checked.client_lag_s < CLIENT_LAG_S or 2 * checked.processes > cpus:
        return None
    return 2 * checked.processes


async def confirm(diagnosis: Diagnosis, config: BenchConfig) -> Confirmation:
    """Offer the deployment as it is the model's max goodput; again with more client processes while the
    client was the limit."""
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
    return Confirmation(rate, s.goodput_rps, s.throughput_rps, s.ttft.p90 or 0.0, s.tpot.p90 or 0.0, s.num_failed,
                        run.client_lag_s, config.processes)
