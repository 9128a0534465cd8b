"""Tokens in, user-visible text out: detokenization and stop strings for one completion.

Text that could still become the start of a stop string is held back until the
next tokens decide; once a stop string appears, the text before it is the last
the client sees and the completion finishes with "stop". With `min_tokens` (vLLM's),
a stop string ends the completion only where it ends in the text of a token at or
past the min_tokens-th. With vLLM's `include_stop_str_in_output` the matched stop string ends the text
instead of being cut; with `skip_special_tokens` false, special tokens stay in the text.
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
    def __init__(self, tokenizer: Any, stop: tuple[str, ...], min_tokens: int = 0, skip_special_tokens: bool = True,
                 include_stop_str: bool = False):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._pending = ""  # decoded but not yet released
        self._stop_from = 0  # a stop string must end past this index of _pending (before: below min_tokens)
        self.is_stopped = False

    def add(self, token_ids: list[int]) -> RelayOutput:
        if self.is_stopped:
            return RelayOutput("", True)
        # the tokens of this chunk whose text cannot stop the completion: the k-th with k < min_tokens
        early = min(len(token_ids), max(self._min_tokens - 1 - self._num_tokens, 0))
        self._num_tokens += len(token_ids)
        if early:
            self._pending += self._detok.add(token_ids[:early])
            self._stop_from = len(self._pending)
        if early < len(token_ids):
            self._pending += self._detok.add(token_ids[early:])
        return self._release(final=False)

    def finish(self) -> RelayOutput:
        """The end of the stream: release what was held back."""
        if self.is_stopped:
            return RelayOutput("", True)
        self._pending += self._detok.flush()
        if self._num_tokens < self._min_tokens:
            self._stop_from = len(self._pending)
        return self._release(final=True)

    def _release(self, final: bool) -> RelayOutput:
        if self._stop:
            hits = [(i, stop) for stop in self._stop if (i := self._find(stop)) >= 0]
            if hits:
                hit, stop = min(hits, key=lambda h: h[0])  # the earliest; the first listed among equals
                end = hit + len(stop) if self._include_stop else hit
                text, self._pending, self.is_stopped = self._pending[:end], "", True
                return RelayOutput(text, True)
        cut = len(self._pending) if final or not self._stop else max(0, len(self._pending) - self._hold)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        self._stop_from = max(self._stop_from - cut, 0)
        return RelayOutput(text, False)

    def _find(self, stop: str) -> int:
        """Where `stop` first occurs in the pending text ending past `_stop_from`; -1 if nowhere."""
        return self._pending.find(stop, max(self._stop_from - len(stop) + 1, 0))
