"""A request's life on a decode replica: its states, and the only edges between them.

    RESERVED ──open──▶ LANDING ──KV landed──▶ WAITING ──admitted──▶ RUNNING ──stop/length──▶ FINISHED
       │                                        ▲  │
       ├──open, prefill_locally──▶ PREFILLING ──┘  └──(its prefill's first token stops it)──▶ FINISHED
       └──open, the first token already ends it──────────────────────────────────────────▶ FINISHED

    every live state ──▶ FAILED, with a FailureCode:
       RESERVED    deadline · aborted (router released it) · invalid open · shutdown
       LANDING     deadline · aborted · transfer failed or timed out (TRANSFER_FAILED) · shutdown
       PREFILLING  deadline · aborted · the prefill step raised (UNAVAILABLE) · shutdown
       WAITING     deadline · aborted · shutdown
       RUNNING     deadline · aborted · the decode step raised (UNAVAILABLE) · shutdown

RESERVED holds blocks for prompt + max_tokens, so a running sequence never runs
out of KV. Every state past RESERVED has an outbox (its router's stream) that
receives its tokens and its `Ending`. FINISHED and FAILED are terminal: the
sequence leaves the worker's table (decode_worker/lifecycle.py, the one place
that changes a state) and its blocks go back to the pool, after any step in
flight that may still write them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pdserve.engine.block_pool import BlockTable
from pdserve.engine.messages import PromptLogprob, SamplingParams, TopLogprobs

from .outbox import Outbox


class SequenceState(enum.Enum):
    RESERVED = "reserved"
    LANDING = "landing"
    PREFILLING = "prefilling"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (SequenceState.FINISHED, SequenceState.FAILED)


# The diagram above as data: Lifecycle.move refuses any other edge.
EDGES: dict[SequenceState, frozenset[SequenceState]] = {
    SequenceState.RESERVED: frozenset({SequenceState.LANDING, SequenceState.PREFILLING, SequenceState.FINISHED,
                                       SequenceState.FAILED}),
    SequenceState.LANDING: frozenset({SequenceState.WAITING, SequenceState.FAILED}),
    SequenceState.PREFILLING: frozenset({SequenceState.WAITING, SequenceState.FAILED}),
    SequenceState.WAITING: frozenset({SequenceState.RUNNING, SequenceState.FINISHED, SequenceState.FAILED}),
    SequenceState.RUNNING: frozenset({SequenceState.FINISHED, SequenceState.FAILED}),
    SequenceState.FINISHED: frozenset(),
    SequenceState.FAILED: frozenset(),
}


@dataclass
class DecodeSequence:
    request_id: str
    transfer_id: int
    table: BlockTable
    num_prompt_tokens: int
    max_tokens: int
    deadline: float
    state: SequenceState = SequenceState.RESERVED
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    outbox: Outbox | None = None  # where its tokens go, once a stream opened it
    stream_interval: int = 1  # its tokens go out every this many (the first and the last at once)
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # scored by its local prefill, when asked
    unsent: list[tuple[int, float | None, TopLogprobs]] = field(default_factory=list)  # (token, logprobs) held back
    num_prefilled: int = 0  # tokens whose KV is in the cache (local chunked prefill)
    opened_at: float = 0.0
    admitted_at: float = 0.0
    kv_wait_s: float = 0.0
    queue_s: float = 0.0  # a local prefill: opened to its first chunk
    prefill_s: float = 0.0
    num_steps: int = 0
    history_slot: int | None = None  # its slot of the runner's token histories, when its params read one
    ready_order: int = 0  # when it became PREFILLING or WAITING: admission keeps this order
    _block_ids: tuple[int, ...] = ()
    _block_ids_released: int = 0  # the table's num_released when _block_ids was built

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def num_tokens(self) -> int:
        """len(tokens), without building the list (the decode loop asks every step)."""
        return len(self.prompt) + len(self.generated)

    @property
    def block_ids(self) -> tuple[int, ...]:
        """The table's block ids as one tuple, rebuilt only when the table changed: the decode
        graphs compare each row's ids by identity first, so an unchanged table costs no work."""
        table = self.table  # tables only grow, return leading blocks (release_before), or empty on release
        if len(self._block_ids) != len(table.block_ids) or self._block_ids_released != table.num_released:
            self._block_ids, self._block_ids_released = tuple(table.block_ids), table.num_released
        return self._block_ids

    @property
    def num_to_prefill(self) -> int:
        """Tokens whose KV a local prefill must compute: all but the last generated one."""
        return len(self.prompt) + max(len(self.generated) - 1, 0)

    def finish_reason(self) -> str | None:
        """Why the sequence should stop now, or None to go on."""
        if self.generated and self.generated[-1] in self.stop_ids:
            return "stop"
        if len(self.generated) >= self.max_tokens:
            return "length"
        return None
