"""A decode replica's live sequences, grouped by state: the one place a sequence's state changes.

`Lifecycle.move` follows only the edges of the diagram in decode_worker/sequence.py
and keeps each live state's group (arrival order) in step with `seq.state`; a
sequence reaching FINISHED or FAILED leaves the table at once and its blocks go
back to the pool (after a queued step that may write them), its token-history slot too. Every method runs
under the worker's lock; each change wakes the lock's waiters (the engine loop, a drain).
"""
from __future__ import annotations

import itertools
import math
import threading
import time

from pdserve.engine.failures import FailureCode
from pdserve.engine.messages import StreamStart
from pdserve.engine.transfer.base import KvReceiver

from .history_slots import HistorySlots
from .outbox import Emission, Ending, Outbox
from .sequence import EDGES, DecodeSequence, SequenceState
from .steps import InFlight

_LIVE = tuple(s for s in SequenceState if not s.is_terminal)


class IllegalTransition(RuntimeError):
    """A state change the lifecycle diagram has no edge for (a bug, never a request's fault)."""


class Lifecycle:
    def __init__(self, receiver: KvReceiver | None, emission: Emission, in_flight: InFlight,
                 history: HistorySlots, changed: threading.Condition, replica_id: str):
        self.receiver = receiver
        self.emission = emission
        self.in_flight = in_flight
        self.history = history
        self.replica_id = replica_id
        self._changed = changed
        self._by_id: dict[int, DecodeSequence] = {}
        self._by_state: dict[SequenceState, dict[int, DecodeSequence]] = {s: {} for s in _LIVE}
        self._ready_orders = itertools.count()

    # ---- reading ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, transfer_id: int) -> DecodeSequence | None:
        return self._by_id.get(transfer_id)

    def all(self) -> list[DecodeSequence]:
        return list(self._by_id.values())

    def of(self, state: SequenceState) -> list[DecodeSequence]:
        """The sequences in `state`, in the order they entered it."""
        return list(self._by_state[state].values())

    def count(self, state: SequenceState) -> int:
        return len(self._by_state[state])

    def has(self, *states: SequenceState) -> bool:
        return any(self._by_state[s] for s in states)

    @property
    def num_waiting(self) -> int:
        """Held but not running: reserved, landing, prefilling or waiting for a batch slot."""
        return len(self._by_id) - self.count(SequenceState.RUNNING)

    # ---- changes ------------------------------------------------------------------

    def add(self, seq: DecodeSequence) -> None:
        """A new reservation (RESERVED)."""
        if seq.state is not SequenceState.RESERVED:
            raise IllegalTransition(f"transfer {seq.transfer_id} enters as {seq.state.name}, not RESERVED")
        self._by_id[seq.transfer_id] = seq
        self._by_state[SequenceState.RESERVED][seq.transfer_id] = seq
        self._changed.notify_all()

    def move(self, seq: DecodeSequence, state: SequenceState) -> None:
        old = seq.state
        if state not in EDGES[old]:
            raise IllegalTransition(f"transfer {seq.transfer_id}: no edge {old.name} → {state.name}")
        del self._by_state[old][seq.transfer_id]
        seq.state = state
        if state.is_terminal:
            del self._by_id[seq.transfer_id]
            if not self.in_flight.hold_release(seq):
                seq.table.release()
            self.history.release(seq)
        else:
            if state is SequenceState.PREFILLING or (state is SequenceState.WAITING and old is not SequenceState.PREFILLING):
                seq.ready_order = next(self._ready_orders)
            self._by_state[state][seq.transfer_id] = seq
        self._changed.notify_all()

    def open(self, start: StreamStart, outbox: Outbox) -> None:
        """Attach a reservation to its subscriber's outbox and start it: land, prefill locally, or end."""
        seq = self._by_id.get(start.transfer_id)
        if seq is None or seq.state is not SequenceState.RESERVED:
            self.emission.end(outbox, Ending(start.transfer_id, error=f"no open reservation {start.transfer_id} "
                                             f"on {self.replica_id}", error_code=FailureCode.INVALID))
            return
        seq.outbox = outbox
        if len(start.prompt) > seq.num_prompt_tokens or start.max_tokens > seq.max_tokens + len(start.generated):
            self.fail(seq, "the stream asks for more tokens than were reserved", FailureCode.INVALID)
            return
        seq.prompt, seq.generated = list(start.prompt), list(start.generated)
        seq.params, seq.stop_ids, seq.max_tokens = start.params, start.stop_ids, start.max_tokens
        seq.stream_interval = start.stream_interval
        seq.deadline, seq.opened_at = min(seq.deadline, start.deadline), time.monotonic()
        if seq.generated and seq.finish_reason():  # prefill's first token already ends it
            self._cancel_transfer(seq)
            self.finish(seq, seq.finish_reason())
        elif start.prefill_locally:
            self._cancel_transfer(seq)
            self.move(seq, SequenceState.PREFILLING)
        else:
            self.move(seq, SequenceState.LANDING)

    def poll_landings(self, transfer_timeout_s: float) -> None:
        """LANDING → WAITING for each sequence whose KV landed; → FAILED where its transfer failed or timed out."""
        now = time.monotonic()
        for seq in self.of(SequenceState.LANDING):
            outcome = self.receiver.poll(seq.transfer_id)
            if outcome is None and now - seq.opened_at > transfer_timeout_s:
                outcome = self.receiver.wait(seq.transfer_id, 0.0)
            if outcome is None:
                continue
            seq.kv_wait_s = now - seq.opened_at
            if not outcome.is_ok:
                self.fail(seq, f"KV transfer failed: {outcome.reason.value}: {outcome.detail}",
                          FailureCode.TRANSFER_FAILED)
                continue
            seq.num_prefilled = seq.num_prompt_tokens
            self.move(seq, SequenceState.WAITING)

    def admit(self, max_running: int) -> None:
        """WAITING → RUNNING in arrival order while the batch has room; never past an earlier local prefill."""
        first_prefilling = min((s.ready_order for s in self.of(SequenceState.PREFILLING)), default=math.inf)
        for seq in sorted(self.of(SequenceState.WAITING), key=lambda s: s.ready_order):
            if self.count(SequenceState.RUNNING) >= max_running or seq.ready_order > first_prefilling:
                return
            seq.admitted_at = time.monotonic()
            self.move(seq, SequenceState.RUNNING)

    def expire_deadlines(self) -> None:
        now = time.time()
        for seq in [s for s in self._by_id.values() if s.deadline < now]:
            self.fail(seq, "the request's deadline passed", FailureCode.DEADLINE)

    def finish(self, seq: DecodeSequence, reason: str) -> None:
        decode_s = time.monotonic() - seq.admitted_at if seq.admitted_at else 0.0
        timings = {"kv_wait_s": seq.kv_wait_s, "prefill_s": seq.prefill_s, "queue_s": seq.queue_s, "decode_s": decode_s,
                   "decode_steps": seq.num_steps}
        self._end(seq, Ending(seq.transfer_id, finish_reason=reason, timings=timings))
        self.move(seq, SequenceState.FINISHED)

    def fail(self, seq: DecodeSequence, message: str, code: FailureCode, notify: bool = True) -> None:
        """End a sequence with an error (told to its subscriber unless `notify` is False) and free its blocks."""
        if seq.state.is_terminal:
            return
        if notify:
            self._end(seq, Ending(seq.transfer_id, error=message, error_code=code))
        if seq.state in (SequenceState.RESERVED, SequenceState.LANDING):
            self._cancel_transfer(seq)
        self.move(seq, SequenceState.FAILED)

    def _end(self, seq: DecodeSequence, ending: Ending) -> None:
        if seq.outbox is not None:
            self.emission.end(seq.outbox, ending)

    def _cancel_transfer(self, seq: DecodeSequence) -> None:
        if self.receiver is not None:
            self.receiver.cancel(seq.transfer_id)
