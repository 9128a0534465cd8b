"""The ranks of a tensor-parallel replica: Ray actors in the replica's placement group.

A replica of TP size N is a Serve replica (rank 0, the leader: its scheduler,
stream server and Serve methods) plus N - 1 `RankActor`s, one in each other
bundle of the replica's STRICT_PACK placement group (one node, a GPU each).
Start-up:

    leader: host_rendezvous -> RankActor(rank r) x (N - 1)   each joins the TP group, loads its shard
            TensorParallel.join(rank 0), loads its shard, sizes the KV pool
            actor.start(num_blocks)                    each builds its runner (and sender or
                                                       receiver) and runs `follow` on a thread

The leader then drives every step through its `TpRunner`. Decode ranks' receivers
are reached through `RemoteRankReceiver` (a Ray call per verb: reservations,
landing polls, cancels), so the leader's `ReceiverGroup` sees one receiver.
A rank that dies breaks the leader's next collective; the replica's health
check then fails and Ray Serve replaces the whole replica (the actors go with
their owner).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Sequence

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.engine.parallel import Rendezvous, TensorParallel, host_rendezvous
from pdserve.engine.transfer import KvDestination, KvShard, TransferOutcome

from .config import PdserveConfig, load_config
from .rank_process import build_runner, kv_host, load_rank_model, rank_device, transfer_backend

log = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 600.0  # a rank loading a large shard from disk may take minutes
_RANK_CALL_TIMEOUT_S = 30.0
# Serve checks a TP replica's ranks this often (its default: 10 s, and 3 misses before a
# replacement): a dead rank stops the whole replica, and its streams wait for the next one.
_HEALTH_CHECK_PERIOD_S = 2.0
POOLS = ("prefill", "decode", "colocated")


def tp_size(config: PdserveConfig, pool: str) -> int:
    return getattr(config, pool).tensor_parallel_size


def placement(config: PdserveConfig, pool: str, gpus_per_rank: float, resources: dict[str, float]) -> dict[str, Any]:
    """Serve deployment options for a pool of TP replicas: one bundle per rank, all on one node."""
    size = tp_size(config, pool)
    if size == 1:
        return {}
    rank_bundle = {"CPU": 0.01, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
    first = {**rank_bundle, **resources}  # the replica actor itself (rank 0) runs in bundle 0
    return {"placement_group_bundles": [first] + [dict(rank_bundle) for _ in range(size - 1)],
            "placement_group_strategy": "STRICT_PACK", "health_check_period_s": _HEALTH_CHECK_PERIOD_S}


class TpGroup:
    """The leader's handle on its replica's ranks (none at TP 1)."""

    def __init__(self, tp: TensorParallel, actors: list[Any]):
        self.tp, self.actors = tp, actors
        self.pids: list[int] = []  # the follower ranks' processes, once started

    @classmethod
    def start(cls, config: PdserveConfig, pool: str, replica_id: str, host: str, device: Any) -> TpGroup:
        """Start ranks 1..N-1 and join them as rank 0 (blocks until all joined)."""
        size = tp_size(config, pool)
        if size == 1:
            return cls(TensorParallel.single(), [])
        rendezvous, store = host_rendezvous(host, timeout_s=config.transfer.timeout_s,
                                            join_timeout_s=_JOIN_TIMEOUT_S)
        group = get_current_placement_group()
        gpus = getattr(config, pool).gpus_per_replica
        actors = []
        for rank in range(1, size):
            strategy = (PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                        if group is not None else None)
            actors.append(RankActor.options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy).remote(
                config.to_dict(), pool, rank, size, rendezvous, f"{replica_id}-r{rank}", host))
        return cls(TensorParallel.join(rendezvous, 0, size, device, store), actors)

    def start_followers(self, num_blocks: int) -> None:
        """Have every follower build its runner on `num_blocks` blocks (every rank's pool holds the
        same block ids) and follow the leader's steps."""
        self.pids = ray.get([actor.start.remote(num_blocks) for actor in self.actors], timeout=_JOIN_TIMEOUT_S)

    def receivers(self) -> list[RemoteRankReceiver]:
        return [RemoteRankReceiver(actor) for actor in self.actors]

    def check_health(self) -> None:
        """Raise when a rank is gone or the group broke (Serve then replaces the replica)."""
        if self.actors:
            ray.get([actor.check_health.remote() for actor in self.actors], timeout=_RANK_CALL_TIMEOUT_S)

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@ray.remote(max_concurrency=4)
class RankActor:
    """One follower rank: its shard, its runner, and its sender or receiver."""

    def __init__(self, config: dict[str, Any], pool: str, rank: int, size: int, rendezvous: Rendezvous,
                 rank_id: str, host: str):
        self.config = load_config(config)
        self.pool, self.rank_id, self.host = pool, rank_id, host
        self.tp = TensorParallel.join(rendezvous, rank, size, rank_device())
        self.loaded = load_rank_model(self.config, self.tp)
        self.receiver = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, num_blocks: int) -> int:
        """Build the runner and follow on a thread; returns this process's id."""
        from pdserve.engine.tp_runner import follow
        from pdserve.engine.transfer import make_receiver, make_sender

        runner = build_runner(self.config, self.loaded, num_blocks, self.tp)
        shard = KvShard(self.tp.rank, self.tp.size, self.loaded.spec.num_kv_heads)
        backend, timeout = transfer_backend(self.config, runner), self.config.transfer.timeout_s
        sender = None
        if self.pool == "prefill":
            sender = make_sender(backend, runner.kv_cache, sender_id=self.rank_id, timeout_s=timeout,
                                 host=kv_host(self.config), shard=shard)
        elif self.pool == "decode":
            self.receiver = make_receiver(backend, runner.kv_cache, host=kv_host(self.config) or self.host,
                                          peer_id=self.rank_id, timeout_s=timeout, shard=shard)

        def run() -> None:
            try:
                follow(runner, sender)
            except BaseException as e:  # noqa: BLE001 - reported by check_health
                log.error("TP rank %s stopped: %s", self.rank_id, e)
                self._error = e

        self._thread = threading.Thread(target=run, name=f"tp-follow-{self.rank_id}", daemon=True)
        self._thread.start()
        return os.getpid()

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"TP rank {self.rank_id}: {self._error}")

    def expect(self, transfer_id: int, block_ids: Sequence[int]) -> None:
        self.receiver.expect(transfer_id, block_ids)

    def destination(self, transfer_id: int, block_ids: Sequence[int]) -> KvDestination:
        return self.receiver.destination(transfer_id, block_ids)

    def poll(self, transfer_id: int) -> TransferOutcome | None:
        return self.receiver.poll(transfer_id)

    def wait(self, transfer_id: int, timeout_s: float) -> TransferOutcome:
        return self.receiver.wait(transfer_id, timeout_s)

    def cancel(self, transfer_id: int) -> None:
        self.receiver.cancel(transfer_id)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()


class RemoteRankReceiver:
    """A follower rank's receiver, seen from the leader (engine/transfer/group.py's `RankReceiver`)."""

    def __init__(self, actor: Any):
        self._actor = actor

    def _call(self, method: Callable, *args: Any, timeout_s: float = _RANK_CALL_TIMEOUT_S) -> Any:
        return ray.get(method.remote(*args), timeout=timeout_s)

    def expect(self, transfer_id: int, block_ids: Sequence[int]) -> None:
        self._call(self._actor.expect, transfer_id, tuple(block_ids))

    def destination(self, transfer_id: int, block_ids: Sequence[int]) -> KvDestination:
        return self._call(self._actor.destination, transfer_id, tuple(block_ids))

    def poll(self, transfer_id: int) -> TransferOutcome | None:
        return self._call(self._actor.poll, transfer_id)

    def wait(self, transfer_id: int, timeout_s: float) -> TransferOutcome:
        return self._call(self._actor.wait, transfer_id, timeout_s, timeout_s=timeout_s + _RANK_CALL_TIMEOUT_S)

    def cancel(self, transfer_id: int) -> None:
        self._call(self._actor.cancel, transfer_id)

    def close(self) -> None:
        try:
            self._call(self._actor.close, timeout_s=10.0)
        except Exception as e:  # the rank may be gone already
            log.debug("TP rank receiver close: %s", e)

