"""Which replica takes a request: the router's own view of the prefill and decode pools.

Every worker replica reports its load, and the address of its gRPC server, to the
registry every half second (cluster/registry.py). A directory reads those reports
in the background and ranks its pool's replicas by the pool's policy
(router/policies.py), so choosing a replica costs a request no call; the router
then calls the replica's own server. Between reports it counts what this router
sent each replica, so a burst does not pile onto the replica that looked emptiest
half a second ago. A replica that failed a call is passed over until it reports
again (or PASS_OVER_S passes).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Generic, Mapping, Sequence, TypeVar

from pdserve.engine.messages import DecodeLoad, PrefillLoad

from .policies import rank_decode_least_loaded, rank_prefill_least_loaded, rank_prefix_aware

log = logging.getLogger(__name__)

REFRESH_S = 0.25  # replicas report every 0.5 s: a view at most ~0.75 s old
PASS_OVER_S = 3.0

Snapshot = Callable[[], Awaitable[Mapping[str, Mapping[str, Mapping[str, Any]]]]]  # the registry's
L = TypeVar("L", DecodeLoad, PrefillLoad)


@dataclass
class Replica(Generic[L]):
    replica_id: str
    address: str  # its gRPC server
    load: L
    reported_at: float
    block_size: int = 0  # decode: tokens per KV block
    sent_tokens: int = 0  # by this router since the report: prompt tokens (prefill), blocks (decode)
    sent_requests: int = 0


class _Directory(Generic[L]):
    """The replicas of one pool in the registry; subclasses read and rank their loads."""

    pool: str
    load_type: type

    def __init__(self, snapshot: Snapshot, policy: str):
        """`policy`: one of router.decode_policy's / router.prefill_policy's names (the config checks them)."""
        self._snapshot, self.policy = snapshot, policy
        self._replicas: dict[str, Replica[L]] = {}
        self._passed_over: dict[str, float] = {}  # replica id -> until when
        self._turn = itertools.count()
        self._task: asyncio.Task | None = None
        self._first: asyncio.Future | None = None

    async def ranked(self, prompt: Sequence[int] = ()) -> list[Replica[L]]:
        """The live replicas, best first for `prompt` (none yet: an empty list)."""
        await self._started()
        now = time.monotonic()
        live = [r for r in self._replicas.values() if self._is_open(r) and self._passed_over.get(r.replica_id, 0.0) <= now]
        if self.policy == "round_robin":
            start = next(self._turn) % max(len(live), 1)
            return live[start:] + live[:start]
        return [live[i] for i in self._rank(live, prompt)]

    async def count(self) -> int:
        """How many replicas of the pool report."""
        await self._started()
        return len(self._replicas)

    def failed(self, replica_id: str) -> None:
        """A call to the replica failed (not a refusal): pass it over for a while."""
        self._passed_over[replica_id] = time.monotonic() + PASS_OVER_S

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _is_open(self, replica: Replica[L]) -> bool:
        return True

    def _rank(self, live: list[Replica[L]], prompt: Sequence[int]) -> list[int]:
        raise NotImplementedError

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
                log.warning("%s directory: cannot read the registry: %s", self.pool, e)
            if not self._first.done():
                self._first.set_result(None)
            await asyncio.sleep(REFRESH_S)

    def _update(self, pools: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        replicas = {}
        for replica_id, stats in pools.get(self.pool, {}).items():
            try:
                replica = Replica(replica_id, stats["address"], self.load_type.from_dict(stats),
                                  float(stats["reported_at"]), int(stats.get("kv_block_size", 0)))
            except KeyError as e:  # LoadReportError is one
                log.warning("%s replica %s: unreadable report: %s", self.pool, replica_id, e)
                continue
            old = self._replicas.get(replica_id)
            if old is not None and old.reported_at == replica.reported_at:  # no new report: keep counting our own
                replica.sent_tokens, replica.sent_requests = old.sent_tokens, old.sent_requests
            else:
                self._passed_over.pop(replica_id, None)
            replicas[replica_id] = replica
        self._replicas = replicas


class DecodeDirectory(_Directory[DecodeLoad]):
    pool, load_type = "decode", DecodeLoad  # colocated replicas report as decode

    def reserved(self, replica: Replica[DecodeLoad], num_tokens: int) -> None:
        replica.sent_tokens += math.ceil(num_tokens / max(replica.block_size, 1))
        replica.sent_requests += 1

    def _is_open(self, replica: Replica[DecodeLoad]) -> bool:
        return not replica.load.is_draining

    def _rank(self, live: list[Replica[DecodeLoad]], prompt: Sequence[int]) -> list[int]:
        return rank_decode_least_loaded([
            replace(r.load, num_blocks_free=max(r.load.num_blocks_free - r.sent_tokens, 0),
                    num_waiting=r.load.num_waiting + r.sent_requests) for r in live])


class PrefillDirectory(_Directory[PrefillLoad]):
    pool, load_type = "prefill", PrefillLoad

    def sent(self, replica: Replica[PrefillLoad], num_prompt_tokens: int) -> None:
        replica.sent_tokens += num_prompt_tokens
        replica.sent_requests += 1

    def _rank(self, live: list[Replica[PrefillLoad]], prompt: Sequence[int]) -> list[int]:
        loads = [replace(r.load, queued_tokens=r.load.queued_tokens + r.sent_tokens,
                         queued_requests=r.load.queued_requests + r.sent_requests) for r in live]
        if self.policy == "prefix_aware":
            return rank_prefix_aware(prompt, [r.replica_id for r in live], loads)
        return rank_prefill_least_loaded(loads)
