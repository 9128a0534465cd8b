"""Tokens in, user-visible text out: detokenization and stop strings for one completion.

Text that could still become the start of a stop string is held back until the
next tokens decide; once a stop string appears, the text before it is the last
the client sees and the completion finishes with "stop".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class RelayOutput:
    text: str
    is_stopped: bool  # a stop string matched: end the completion


class TextRelay:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded but not yet released
        self.is_stopped = False

    def add(self, token_ids: list[int]) -> RelayOutput:
        if self.is_stopped:
            return RelayOutput("", True)
        self._pending += self._detok.add(token_ids)
        return self._release(final=False)

    def finish(self) -> RelayOutput:
        """The end of the stream: release what was held back."""
        if self.is_stopped:
            return RelayOutput("", True)
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> RelayOutput:
        if self._stop:
            hit = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
            if hit >= 0:
                text, self._pending, self.is_stopped = self._pending[:hit], "", True
                return RelayOutput(text, True)
        cut = len(self._pending) if final or not self._stop else max(0, len(self._pending) - self._hold)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return RelayOutput(text, False)
