"""A bench's result: every run's offered load, request records and pool reports, and its JSON form.

The leaf of the bench package: the bench writes it, `pdserve diagnose` and the plots read it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import RequestRecord
from .stats import RunSummary, Slo, summarize

FORMAT_VERSION = 1


@dataclass
class Run:
    """One run: its offered load, what every request saw, and the pools while it ran."""

    rate: float | None
    concurrency: int | None
    duration_s: float
    requests: list[RequestRecord]
    pools: list[dict[str, Any]] = field(default_factory=list)  # {"t": seconds, "pools": {pool: {replica: stats}}}
    client_lag_s: float = 0.0  # p90 of the bench client's own event-loop lag while it ran (a busy client)

    def summary(self, slo: Slo) -> RunSummary:
        return summarize(self.requests, self.duration_s, slo, self.rate, self.concurrency)


@dataclass
class BenchResult:
    target: dict[str, Any]  # url, protocol, the status the server gave at the start
    workload: dict[str, Any]
    slo: Slo
    runs: list[Run]
    date: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {
            "pdserve_bench": FORMAT_VERSION, "date": self.date, "target": self.target, "workload": self.workload,
            "slo": dataclasses.asdict(self.slo),
            "runs": [{"summary": dataclasses.asdict(run.summary(self.slo)), **dataclasses.asdict(run)}
                     for run in self.runs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchResult":
        runs = [Run(r["rate"], r["concurrency"], r["duration_s"], [RequestRecord(**q) for q in r["requests"]],
                    r["pools"], r.get("client_lag_s", 0.0)) for r in data["runs"]]
        return cls(data["target"], data["workload"], Slo(**data["slo"]), runs, data["date"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "BenchResult":
        return cls.from_json(json.loads(path.read_text()))
