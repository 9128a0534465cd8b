"""The receivers of a TP decode replica's ranks, seen by its leader as one.

Each rank's pool holds only its kv heads and has its own receiver; the leader's
scheduler reserves blocks once, for all ranks (they hold the same block ids).
A `ReceiverGroup` expects a transfer on every rank, hands out one destination
naming every rank's channel, and calls a transfer landed once it landed on
every rank (failed as soon as one rank's failed, the others then cancelled).
Rank 0 is the leader's own receiver; the others are anything with the same
verbs (in cluster/, handles that call the follower ranks).
"""
from __future__ import annotations

import time
from typing import Protocol, Sequence

from pdserve.engine.transfer.messages import KvDestination, TransferOutcome


class RankReceiver(Protocol):
    def expect(self, transfer_id: int, block_ids: Sequence[int]) -> None: ...
    def destination(self, transfer_id: int, block_ids: Sequence[int]) -> KvDestination: ...
    def poll(self, transfer_id: int) -> TransferOutcome | None: ...
    def wait(self, transfer_id: int, timeout_s: float) -> TransferOutcome: ...
    def cancel(self, transfer_id: int) -> None: ...
    def close(self) -> None: ...


class ReceiverGroup:
    """`KvReceiver`'s verbs over the receivers of every rank of one replica (rank order)."""

    def __init__(self, ranks: Sequence[RankReceiver]):
        self.ranks = list(ranks)
        self._landed: dict[int, set[int]] = {}  # transfer id -> ranks whose part landed

    def expect(self, transfer_id: int, block_ids: Sequence[int]) -> None:
        for rank in self.ranks:
            rank.expect(transfer_id, block_ids)
        self._landed[transfer_id] = set()

    def destination(self, transfer_id: int, block_ids: Sequence[int]) -> KvDestination:
        return KvDestination.of_ranks([rank.destination(transfer_id, block_ids) for rank in self.ranks])

    def poll(self, transfer_id: int) -> TransferOutcome | None:
        """Landed on every rank, or failed on one (then forgotten); None while some rank waits.

        Ranks are asked in order and only until one is still open: the leader's own,
        in-process answer usually says the transfer is in flight."""
        landed = self._landed.setdefault(transfer_id, set())
        for index, rank in enumerate(self.ranks):
            if index in landed:
                continue
            outcome = rank.poll(transfer_id)
            if outcome is None:
                return None
            if not outcome.is_ok:
                return self._fail(transfer_id, outcome, landed | {index})
            landed.add(index)
        self._landed.pop(transfer_id, None)
        return TransferOutcome(transfer_id)

    def wait(self, transfer_id: int, timeout_s: float) -> TransferOutcome:
        deadline = time.monotonic() + timeout_s
        landed = self._landed.setdefault(transfer_id, set())
        for index, rank in enumerate(self.ranks):
            if index in landed:
                continue
            outcome = rank.wait(transfer_id, max(0.0, deadline - time.monotonic()))
            if not outcome.is_ok:
                return self._fail(transfer_id, outcome, landed | {index})
            landed.add(index)
        self._landed.pop(transfer_id, None)
        return TransferOutcome(transfer_id)

    def cancel(self, transfer_id: int) -> None:
        landed = self._landed.pop(transfer_id, set())
        for index, rank in enumerate(self.ranks):
            if index not in landed:
                rank.cancel(transfer_id)

    def close(self) -> None:
        for rank in self.ranks:
            rank.close()

    def _fail(self, transfer_id: int, outcome: TransferOutcome, settled: set[int]) -> TransferOutcome:
        """One rank's part failed: the others stop expecting it (their blocks are freed with it)."""
        self._landed.pop(transfer_id, None)
        for index, rank in enumerate(self.ranks):
            if index not in settled:
                rank.cancel(transfer_id)
        return outcome
