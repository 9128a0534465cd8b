"""What a decode replica measures about its own traffic: arrivals and tokens out, over recent windows."""
from __future__ import annotations

import collections
import threading
import time


class RateMeter:
    """Events and their sizes over a sliding window: a rate per second and a mean size."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, size: float) -> None:
        with self._lock:
            self._events.append((time.monotonic(), size))

    def rate_and_mean(self) -> tuple[float, float]:
        now = time.monotonic()
        with self._lock:
            while self._events and now - self._events[0][0] > self.window_s:
                self._events.popleft()
            count, total = len(self._events), sum(size for _, size in self._events)
        span = min(self.window_s, max(now - self._started, 1e-3))
        return count / span, total / count if count else 0.0


class TokenRate:
    """Tokens emitted per second over the last `maxlen` emissions (the engine thread adds, under the worker's lock)."""

    def __init__(self, maxlen: int = 256):
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=maxlen)

    def add(self, num_tokens: int) -> None:
        self._samples.append((time.monotonic(), num_tokens))

    def per_s(self) -> float:
        samples = list(self._samples)
        if len(samples) < 2:
            return 0.0
        span = samples[-1][0] - samples[0][0]
        return sum(n for _, n in samples[1:]) / span if span > 0 else 0.0


class HostTimePerSeq:
    """The decode loop's own host seconds per running sequence per step, over recent turns."""

    def __init__(self, maxlen: int = 64):
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=maxlen)

    def add(self, seconds: float, num_seqs: int) -> None:
        self._samples.append((seconds, num_seqs))

    def per_seq(self) -> float:
        samples = list(self._samples)
        total = sum(n for _, n in samples)
        return sum(t for t, _ in samples) / total if total else 0.0
