"""The decode steps a replica has queued on the device, and what goes into one.

With the loop one step ahead (`DecodeSettings.overlap_steps`) step N+1 is queued
before step N's tokens are read, so a step's row may take its last token from the
step before it, still on the device. Blocks freed while a step that may write them
is in flight wait for that step to end (`InFlight.hold_release`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.block_pool import BlockTable
from pdserve.engine.runner import DecodeInput, PrefillChunk, leaves_graphs
from pdserve.engine.sampler import PendingSample

from .sequence import DecodeSequence


def decode_input(seq: DecodeSequence, source: int = -1) -> DecodeInput:
    """A sequence's row of a decode step: its last token, at its position, over its blocks.

    `source` >= 0: the last token is the one the step in flight samples in that row,
    not yet on the host; it sits one position past the host's last token."""
    if source < 0:
        return DecodeInput(seq.generated[-1], seq.num_tokens - 1, seq.block_ids)
    return DecodeInput(0, seq.num_tokens, seq.block_ids, source)


def prefill_chunks(prefilling: list[DecodeSequence], budget: int,
                   graph_holds: Callable[[list[PrefillChunk]], bool]) -> list[tuple[DecodeSequence, PrefillChunk]]:
    """One chunk for each prefilling sequence, in order, under the step's token budget; a batch a
    CUDA graph replays stays one (`leaves_graphs`: an eager launch here also delays the decode step)."""
    batch: list[tuple[DecodeSequence, PrefillChunk]] = []
    for seq in prefilling:
        if budget <= 0:
            break
        tokens = seq.tokens[: seq.num_to_prefill]
        end = min(len(tokens), seq.num_prefilled + budget)
        chunk = PrefillChunk(tuple(tokens[seq.num_prefilled:end]), seq.num_prefilled, seq.block_ids,
                             seq.params.prompt_logprobs is not None)
        if leaves_graphs(graph_holds, [c for _, c in batch], chunk):
            break
        batch.append((seq, chunk))
        budget -= len(chunk.token_ids)
    return batch


@dataclass
class Step:
    """A decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[DecodeSequence]
    rows: dict[int, int]  # transfer id -> row
    sample: PendingSample | None = None
    released: list[BlockTable] = field(default_factory=list)  # freed while this step might write them


class InFlight:
    """The queued steps, oldest first (at most two, for a moment)."""

    def __init__(self) -> None:
        self._steps: deque[Step] = deque()

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def newest(self) -> Step | None:
        return self._steps[-1] if self._steps else None

    @property
    def oldest(self) -> Step:
        return self._steps[0]

    def push(self, step: Step) -> None:
        self._steps.append(step)

    def pop_oldest(self) -> Step:
        return self._steps.popleft()

    def hold_release(self, seq: DecodeSequence) -> bool:
        """Keep `seq`'s blocks from the pool until the newest step ends, if a queued step may write them."""
        if not any(seq.transfer_id in step.rows for step in self._steps):
            return False
        self._steps[-1].released.append(seq.table)
        return True

    def clear(self) -> list[Step]:
        """Forget every step (after one raised); the caller releases what they held."""
        steps = list(self._steps)
        self._steps.clear()
        return steps
