"""Where replicas report their load, and where the router, `pdserve status`,
metrics and the autoscaling policy read it.

One named Ray actor per cluster. Each worker replica reports a small dict every
`REPORT_INTERVAL_S`; entries older than `STALE_AFTER_S` are dropped, so a
replica that died disappears on its own.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray

log = logging.getLogger(__name__)

REGISTRY_NAME = "pdserve-registry"
REGISTRY_NAMESPACE = "pdserve"
REPORT_INTERVAL_S = 0.5
STALE_AFTER_S = 10.0


@ray.remote(num_cpus=0, max_concurrency=64)
class Registry:
    def __init__(self) -> None:
        self._reports: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._notes: dict[str, Any] = {}

    def report(self, pool: str, replica_id: str, stats: dict[str, Any]) -> None:
        self._reports[(pool, replica_id)] = (time.time(), stats)

    def forget(self, pool: str, replica_id: str) -> None:
        self._reports.pop((pool, replica_id), None)

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{pool: {replica_id: stats}} of the live replicas."""
        now = time.time()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (pool, replica), (at, stats) in list(self._reports.items()):
            if now - at > STALE_AFTER_S:
                del self._reports[(pool, replica)]
                continue
            out.setdefault(pool, {})[replica] = stats
        return out

    def note(self, key: str, value: Any) -> None:
        """Cluster-wide facts (the autoscaler's last decision, targets)."""
        self._notes[key] = value

    def notes(self) -> dict[str, Any]:
        return dict(self._notes)


# Ray's own resource of the head node: the registry lives there, beside Serve's controller, so
# losing a worker node never loses it (and if it dies anyway, it restarts and replicas re-report).
_ON_HEAD_NODE = {"node:__internal_head__": 0.001}


def registry() -> Any:
    """The cluster's registry actor, created by whoever asks first."""
    return Registry.options(name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True,
                            lifetime="detached", resources=_ON_HEAD_NODE, max_restarts=-1).remote()


class Reporter:
    """A replica's background thread that sends `stats()` to the registry."""

    def __init__(self, pool: str, replica_id: str, stats: Callable[[], dict[str, Any]]):
        self._pool, self._replica_id, self._stats = pool, replica_id, stats
        self._registry = registry()
        self._stop = threading.Event()
        self._failure: str | None = None  # the last stats failure logged
        self._thread = threading.Thread(target=self._run, name=f"report-{pool}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S):
            stats = self._read_stats()
            if stats is None:
                continue
            try:  # reported_at: a reader tells a new report from an unchanged one
                self._registry.report.remote(self._pool, self._replica_id, {**stats, "reported_at": time.time()})
            except Exception:  # the registry restarting must not take the replica down
                pass

    def _read_stats(self) -> dict[str, Any] | None:
        """The replica's stats, or None (logged, each new failure once) when computing them failed:
        its load then goes unreported, which routing, status and diagnose would otherwise read as idle."""
        try:
            stats = self._stats()
        except Exception as e:
            if repr(e) != self._failure:
                self._failure = repr(e)
                log.exception("%s replica %s: its stats failed, so it reports nothing until they work again",
                              self._pool, self._replica_id)
            return None
        self._failure = None
        return stats

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._registry.forget.remote(self._pool, self._replica_id)
        except Exception:
            pass
