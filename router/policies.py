"""Routing policies: which prefill and which decode replica take a request.

Each policy is a ranking over the replicas' own reports (Ray Serve's routing
stats, which the worker deployments record every half second), plugged into
Ray Serve as a request router of the pool's deployment:

    round_robin    replicas in turn
    least_loaded   prefill: fewest queued prompt tokens; decode: most free KV
                   blocks, then the smallest running batch
    prefix_aware   prefill: requests whose prompts share their first block of
                   tokens go to the same replica (rendezvous hashing), unless
                   it has PREFIX_SLACK_TOKENS more queued than the least loaded

The ranking functions are pure; the `RequestRouter` classes only adapt them.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_TOKENS = 64  # the prompt head that decides affinity
PREFIX_SLACK_TOKENS = 4096  # queued prompt tokens the preferred replica may carry beyond the least loaded


def rank_prefill_least_loaded(stats: Sequence[dict[str, Any]]) -> list[int]:
    """Indices from the fewest queued prompt tokens to the most."""
    return sorted(range(len(stats)), key=lambda i: stats[i].get("queued_tokens", 0))


def rank_decode_least_loaded(stats: Sequence[dict[str, Any]]) -> list[int]:
    """Indices from the most free KV blocks (then fewest running) to the least."""
    return sorted(range(len(stats)), key=lambda i: (-stats[i].get("num_blocks_free", 0),
                                                    stats[i].get("num_running", 0) + stats[i].get("num_waiting", 0)))


def rank_prefix_aware(prompt: Sequence[int], replica_ids: Sequence[str], stats: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt head's replica first, if its queue is not far above the least loaded."""
    by_load = rank_prefill_least_loaded(stats)
    if not prompt or not replica_ids:
        return by_load
    head = ",".join(map(str, prompt[:PREFIX_TOKENS]))
    preferred = max(range(len(replica_ids)), key=lambda i: _score(head, replica_ids[i]))
    least = stats[by_load[0]].get("queued_tokens", 0)
    if stats[preferred].get("queued_tokens", 0) - least > PREFIX_SLACK_TOKENS:
        return by_load
    return [preferred] + [i for i in by_load if i != preferred]


def _score(key: str, replica_id: str) -> int:
    """Rendezvous hashing: a replica leaving moves only its own prefixes."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


class _RankingRouter(RequestRouter):
    """Adapts a ranking to Ray Serve: one rank per replica, best first."""

    def rank(self, replicas: list[RunningReplica], request: PendingRequest | None) -> list[int]:
        raise NotImplementedError

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        order = self.rank(candidate_replicas, pending_request)
        return [[candidate_replicas[i]] for i in order]


class RoundRobinRouter(_RankingRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._turn = itertools.count()

    def rank(self, replicas, request):
        start = next(self._turn) % len(replicas)
        return [(start + i) % len(replicas) for i in range(len(replicas))]


class PrefillLeastLoadedRouter(_RankingRouter):
    def rank(self, replicas, request):
        return rank_prefill_least_loaded([r.routing_stats for r in replicas])


class DecodeLeastLoadedRouter(_RankingRouter):
    def rank(self, replicas, request):
        return rank_decode_least_loaded([r.routing_stats for r in replicas])


class PrefixAwareRouter(_RankingRouter):
    def rank(self, replicas, request):
        prompt = request.kwargs.get("prompt", ()) if request is not None else ()
        return rank_prefix_aware(prompt, [r.replica_id.unique_id for r in replicas],
                                 [r.routing_stats for r in replicas])


PREFILL_POLICIES = {"round_robin": RoundRobinRouter, "least_loaded": PrefillLeastLoadedRouter,
                    "prefix_aware": PrefixAwareRouter}
DECODE_POLICIES = {"round_robin": RoundRobinRouter, "least_loaded": DecodeLeastLoadedRouter}
