"""Where a decode replica's tokens leave: one `Outbox` per subscriber (a router's stream).

The engine thread adds every sequence's token of a step to its subscriber's outbox
under the worker's lock, then flushes each outbox it touched once: a step costs each
subscriber one hand-over (one message on its stream), whatever the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.failures import FailureCode
from pdserve.engine.messages import PromptLogprob, TopLogprobs


@dataclass(frozen=True)
class Ending:
    """A request's last word: finished (`finish_reason`) or failed (`error`, `error_code`)."""

    transfer_id: int
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None
    error_code: FailureCode | None = None
    timings: dict[str, float] | None = None  # kv_wait_s, queue_s, prefill_s, decode_s, decode_steps


@dataclass
class TokenBatch:
    """Token i is transfer_ids[i]'s; endings follow the tokens of the same batch."""

    transfer_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_top: list[int] = field(default_factory=list)  # token i's alternatives: num_top[i] of top_*, in order
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, tuple[PromptLogprob, ...]]] = field(default_factory=list)  # (transfer id, ...)
    endings: list[Ending] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transfer_ids or self.endings)

    def extend(self, other: "TokenBatch") -> None:
        self.transfer_ids += other.transfer_ids
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.num_top += other.num_top
        self.top_token_ids += other.top_token_ids
        self.top_logprobs += other.top_logprobs
        self.prompt_logprobs += other.prompt_logprobs
        self.endings += other.endings


class Outbox:
    """One subscriber's pending tokens; `deliver` gets each flushed batch (it must not block)."""

    def __init__(self, deliver: Callable[[TokenBatch], None], subscriber_id: str = ""):
        self.subscriber_id = subscriber_id
        self._deliver = deliver
        self._batch = TokenBatch()

    def token(self, transfer_id: int, token_id: int, logprob: float | None, top: TopLogprobs = ()) -> None:
        batch = self._batch
        batch.transfer_ids.append(transfer_id)
        batch.token_ids.append(token_id)
        batch.logprobs.append(0.0 if logprob is None else logprob)
        batch.num_top.append(len(top))
        for top_id, top_logprob in top:
            batch.top_token_ids.append(top_id)
            batch.top_logprobs.append(top_logprob)

    def prompt_logprobs(self, transfer_id: int, scored: tuple[PromptLogprob, ...]) -> None:
        self._batch.prompt_logprobs.append((transfer_id, scored))

    def end(self, ending: Ending) -> None:
        self._batch.endings.append(ending)

    def flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, TokenBatch()
            self._deliver(batch)


class Emission:
    """The outboxes written since the last flush: every write goes through here, and `flush`
    hands each its batch once (called under the worker's lock, once per step)."""

    def __init__(self) -> None:
        self._unflushed: set[Outbox] = set()

    def token(self, outbox: Outbox, transfer_id: int, token_id: int, logprob: float | None,
              top: TopLogprobs = ()) -> None:
        outbox.token(transfer_id, token_id, logprob, top)
        self._unflushed.add(outbox)

    def prompt_logprobs(self, outbox: Outbox, transfer_id: int, scored: tuple[PromptLogprob, ...]) -> None:
        outbox.prompt_logprobs(transfer_id, scored)
        self._unflushed.add(outbox)

    def end(self, outbox: Outbox, ending: Ending) -> None:
        outbox.end(ending)
        self._unflushed.add(outbox)

    def forget(self, outbox: Outbox) -> None:
        """Its subscriber is gone: nothing more is handed to it."""
        self._unflushed.discard(outbox)

    def flush(self) -> None:
        for outbox in self._unflushed:
            outbox.flush()
        self._unflushed.clear()
