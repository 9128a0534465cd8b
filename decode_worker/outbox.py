"""Where a decode replica's tokens leave: one `Outbox` per subscriber (a router's stream).

The engine thread adds every sequence's token of a step to its subscriber's outbox
under the worker's lock, then flushes each outbox it touched once: a step costs each
subscriber one hand-over (one message on its stream), whatever the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.failures import FailureCode


@dataclass(frozen=True)
class Ending:
    """A request's last word: finished (`finish_reason`) or failed (`error`, `error_code`)."""

    transfer_id: int
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None
    error_code: FailureCode | None = None
    timings: dict[str, float] | None = None  # kv_wait_s, prefill_s, decode_s, decode_steps


@dataclass
class TokenBatch:
    """Token i is transfer_ids[i]'s; endings follow the tokens of the same batch."""

    transfer_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    endings: list[Ending] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transfer_ids or self.endings)

    def extend(self, other: "TokenBatch") -> None:
        self.transfer_ids += other.transfer_ids
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.endings += other.endings


class Outbox:
    """One subscriber's pending tokens; `deliver` gets each flushed batch (it must not block)."""

    def __init__(self, deliver: Callable[[TokenBatch], None], subscriber_id: str = ""):
        self.subscriber_id = subscriber_id
        self._deliver = deliver
        self._batch = TokenBatch()

    def token(self, transfer_id: int, token_id: int, logprob: float | None) -> None:
        self._batch.transfer_ids.append(transfer_id)
        self._batch.token_ids.append(token_id)
        self._batch.logprobs.append(0.0 if logprob is None else logprob)

    def end(self, ending: Ending) -> None:
        self._batch.endings.append(ending)

    def flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, TokenBatch()
            self._deliver(batch)
