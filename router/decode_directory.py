"""Which decode replica takes a request: the router's own view of the decode pool.

Decode replicas report their load, and the address of their stream server, to the
registry every half second (cluster/registry.py). The directory reads those reports
in the background and ranks the replicas by the pool's policy (router/policies.py),
so choosing a replica costs a request no call; the router then reserves on the
replica's stream server itself. Between reports it counts the blocks this router
reserved, so a burst does not pile onto the replica that looked emptiest half a
second ago. A replica that failed a call is passed over until it reports again.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping

from pdserve.engine.messages import DecodeLoad

from .policies import rank_decode_least_loaded

log = logging.getLogger(__name__)

REFRESH_S = 0.25  # replicas report every 0.5 s: a view at most ~0.75 s old
PASS_OVER_S = 3.0  # a replica that failed a call is skipped this long, unless it reports anew first
POLICIES = ("round_robin", "least_loaded")
POOL = "decode"  # colocated replicas report as decode replicas too

Snapshot = Callable[[], Awaitable[Mapping[str, Mapping[str, Mapping[str, Any]]]]]  # the registry's


@dataclass
class DecodeReplica:
    replica_id: str
    stream_address: str
    load: DecodeLoad
    block_size: int
    reported_at: float
    reserved_blocks: int = 0  # by this router since the report
    reserved_requests: int = 0

    def adjusted(self) -> DecodeLoad:
        """The report, less what this router reserved since."""
        return replace(self.load, num_blocks_free=max(self.load.num_blocks_free - self.reserved_blocks, 0),
                       num_waiting=self.load.num_waiting + self.reserved_requests)


class DecodeDirectory:
    def __init__(self, snapshot: Snapshot, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"decode policy {policy!r}: one of {', '.join(POLICIES)}")
        self._snapshot, self.policy = snapshot, policy
        self._replicas: dict[str, DecodeReplica] = {}
        self._passed_over: dict[str, float] = {}  # replica id -> until when
        self._turn = itertools.count()
        self._task: asyncio.Task | None = None
        self._first: asyncio.Future | None = None

    async def ranked(self) -> list[DecodeReplica]:
        """The live replicas, best first (none yet: an empty list)."""
        await self._started()
        now = time.monotonic()
        live = [r for r in self._replicas.values()
                if not r.load.is_draining and self._passed_over.get(r.replica_id, 0.0) <= now]
        if self.policy == "round_robin":
            start = next(self._turn) % max(len(live), 1)
            return live[start:] + live[:start]
        return [live[i] for i in rank_decode_least_loaded([r.adjusted() for r in live])]

    def reserved(self, replica: DecodeReplica, num_tokens: int) -> None:
        replica.reserved_blocks += math.ceil(num_tokens / replica.block_size)
        replica.reserved_requests += 1

    def failed(self, replica_id: str) -> None:
        """A call to the replica failed (not a refusal): pass it over for a while."""
        self._passed_over[replica_id] = time.monotonic() + PASS_OVER_S

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _started(self) -> None:
        if self._task is None:  # on the first request, on the loop that serves them
            self._first = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if not self._first.done():
            await asyncio.shield(self._first)

    async def _run(self) -> None:
        while True:
            try:
                self._update(await self._snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the registry restarting: keep the last view
                log.warning("decode directory: cannot read the registry: %s", e)
            if not self._first.done():
                self._first.set_result(None)
            await asyncio.sleep(REFRESH_S)

    def _update(self, pools: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        replicas = {}
        for replica_id, stats in pools.get(POOL, {}).items():
            try:
                load = DecodeLoad.from_dict(stats)
                replica = DecodeReplica(replica_id, stats["stream_address"], load, int(stats["kv_block_size"]),
                                        float(stats["reported_at"]))
            except KeyError as e:  # LoadReportError is one
                log.warning("decode replica %s: unreadable report: %s", replica_id, e)
                continue
            old = self._replicas.get(replica_id)
            if old is not None and old.reported_at == replica.reported_at:  # no new report: keep counting our own
                replica.reserved_blocks, replica.reserved_requests = old.reserved_blocks, old.reserved_requests
            else:
                self._passed_over.pop(replica_id, None)
            replicas[replica_id] = replica
        self._replicas = replicas
