"""Which slot of the runner's `TokenCounts` (engine/penalties.py) each running sequence holds.

A sequence whose params read its token history (a penalty) takes a slot at its first decode
step here and fills it from the host's tokens: that step is never fed back from a step in
flight (the sequence was in none), so the host has every token then. Later steps count each
sampled token on the device. The slot comes back when the sequence ends; a step still in flight
may count into it after that, but the next owner's fill is queued behind that step and resets it.
"""
from __future__ import annotations

import heapq

from pdserve.engine.penalties import RowHistory, TokenFill

from .sequence import DecodeSequence


class HistorySlots:
    def __init__(self) -> None:
        self._free: list[int] = []  # a heap: the lowest slots are reused first, so the table stays small
        self._num_slots = 0

    def histories(self, batch: list[DecodeSequence], fed_back: list[bool]) -> list[RowHistory | None] | None:
        """Each row's history for the step (`fed_back[i]`: its last token is in flight); None where no
        row's params adjust the logits (the step then does what it did without any of this)."""
        if not any(seq.params.adjusts_logits for seq in batch):
            return None
        return [self._history(seq, in_flight) if seq.params.adjusts_logits else None
                for seq, in_flight in zip(batch, fed_back)]

    def release(self, seq: DecodeSequence) -> None:
        """Its slot back (the sequence ended)."""
        if seq.history_slot is not None:
            heapq.heappush(self._free, seq.history_slot)
            seq.history_slot = None

    def _history(self, seq: DecodeSequence, in_flight: bool) -> RowHistory:
        fill = None
        if seq.params.needs_history and seq.history_slot is None:
            seq.history_slot = self._take()
            fill = TokenFill(tuple(seq.prompt), tuple(seq.generated))
        return RowHistory(len(seq.generated) + in_flight, seq.stop_ids, seq.history_slot, fill)

    def _take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._num_slots += 1
        return self._num_slots - 1
