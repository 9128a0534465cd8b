"""Routing policies: which prefill and which decode replica take a request.

Each policy is a ranking over the replicas' own reports, read back as typed
`PrefillLoad` / `DecodeLoad` by the router's directories (router/directory.py):

    round_robin    replicas in turn
    least_loaded   prefill: fewest queued prompt tokens; decode: most free KV
                   blocks, then the smallest running batch
    prefix_aware   prefill: requests whose prompts share their first block of
                   tokens go to the same replica (rendezvous hashing), unless
                   it has PREFIX_SLACK_TOKENS more queued than the least loaded

The ranking functions are pure.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from pdserve.engine.messages import DecodeLoad, PrefillLoad

PREFIX_TOKENS = 64  # the prompt head that decides affinity
PREFIX_SLACK_TOKENS = 4096  # queued prompt tokens the preferred replica may carry beyond the least loaded


def rank_prefill_least_loaded(loads: Sequence[PrefillLoad]) -> list[int]:
    """Indices from the fewest queued prompt tokens to the most."""
    return sorted(range(len(loads)), key=lambda i: loads[i].queued_tokens)


def rank_decode_least_loaded(loads: Sequence[DecodeLoad]) -> list[int]:
    """Indices from the most free KV blocks (then fewest held requests) to the least."""
    return sorted(range(len(loads)), key=lambda i: (-loads[i].num_blocks_free, loads[i].num_running + loads[i].num_waiting))


def rank_prefix_aware(prompt: Sequence[int], replica_ids: Sequence[str], loads: Sequence[PrefillLoad]) -> list[int]:
    """The prompt head's replica first, if its queue is not far above the least loaded."""
    by_load = rank_prefill_least_loaded(loads)
    if not prompt or not replica_ids:
        return by_load
    head = ",".join(map(str, prompt[:PREFIX_TOKENS]))
    preferred = max(range(len(replica_ids)), key=lambda i: _score(head, replica_ids[i]))
    if loads[preferred].queued_tokens - loads[by_load[0]].queued_tokens > PREFIX_SLACK_TOKENS:
        return by_load
    return [preferred] + [i for i in by_load if i != preferred]


def _score(key: str, replica_id: str) -> int:
    """Rendezvous hashing: a replica leaving moves only its own prefixes."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")
