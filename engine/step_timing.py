"""How busy the device is while an engine loop runs: its busy time per step beside the step's wall time.

An engine loop (the decode worker's steps, the prefill worker's batches) brackets the
device work it launches with `work()`, calls `step_done()` when it has read a step's
results, and `waiting()` when it has nothing to do:

    with clock.work(batch_size):      # launch the forward and sampling
        pending = runner.decode_and_sample(...)
    ...
    pending.result(); clock.step_done()

- Busy time: on CUDA, events recorded on the loop's stream around the launched work
  (read once they completed, never waited for); on the CPU the work runs inside the
  call, and the call's time is the busy time.
- Wall time: the loop's step period, from the previous `step_done` (or the first work
  after a `waiting`) to this one. Wall minus busy is host time the device did not
  hide: the loop's Python, emitting tokens, locks, waiting on other threads.
- Launch time (CUDA only): the host's time inside the `work()` bracket. The device is
  timed from the bracket's start, so a step whose kernels wait for Python to launch
  them (eager, no CUDA graph) reads busy; busy close to its launch time says so.

`times()` gives means over the recent window and the idle share, 1 - busy / wall.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

WINDOW_STEPS = 64


@dataclass(frozen=True)
class StepTimes:
    """Means over the recent window of steps (0 where nothing was measured yet)."""

    num_steps: int
    wall_s: float  # the step period
    busy_s: float  # device time per period, all the work launched in it
    step_busy_s: float  # device time of one sized step (a decode step: the (batch, time) point)
    launch_s: float  # host time launching a sized step (0 on the CPU)
    size: float  # mean size of those steps (batch size, or tokens per prefill batch)
    idle_share: float  # 1 - busy / wall: how much of the loop's time the device had nothing to do

    @property
    def host_s(self) -> float:
        """Host time per step the device did not hide."""
        return max(self.wall_s - self.busy_s, 0.0)


@dataclass
class _Span:
    size: int
    start: torch.cuda.Event | None
    end: torch.cuda.Event | None
    launch_s: float
    busy_s: float = 0.0  # known at once on the CPU


class StepClock:
    def __init__(self, device: torch.device, window: int = WINDOW_STEPS):
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._pending: deque[_Span] = deque()  # CUDA spans whose events have not completed
        self._period_start: float | None = None
        self._period_busy = 0.0
        self._periods: deque[tuple[float, float]] = deque(maxlen=window)  # (wall, busy)
        self._steps: deque[tuple[int, float, float]] = deque(maxlen=window)  # (size, busy, launch) of sized work

    @contextmanager
    def work(self, size: int = 0) -> Iterator[None]:
        """Bracket launching device work; `size` > 0 makes it a step point (batch size, tokens)."""
        now = time.perf_counter()
        if self._period_start is None:
            self._period_start = now
        start = end = None
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        yield
        launch_s = time.perf_counter() - now
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append(_Span(size, start, end, launch_s))
        else:
            self._settled(_Span(size, None, None, 0.0, launch_s))

    def step_done(self) -> None:
        """The loop read a step's results: one wall period ends (call on the loop's thread)."""
        now = time.perf_counter()
        while self._pending and self._pending[0].end.query():
            span = self._pending.popleft()
            span.busy_s = span.start.elapsed_time(span.end) / 1e3
            self._settled(span)
        if self._period_start is None:
            return
        with self._lock:
            self._periods.append((now - self._period_start, self._period_busy))
        self._period_start, self._period_busy = now, 0.0

    def waiting(self) -> None:
        """The loop has nothing to do: time until its next work is nobody's."""
        self._period_start, self._period_busy = None, 0.0

    def times(self) -> StepTimes:
        with self._lock:
            periods, steps = list(self._periods), list(self._steps)
        wall, busy = sum(w for w, _ in periods), sum(b for _, b in periods)
        n, count = len(periods) or 1, len(steps) or 1
        return StepTimes(
            num_steps=len(periods), wall_s=wall / n, busy_s=busy / n,
            step_busy_s=sum(b for _, b, _ in steps) / count, launch_s=sum(x for _, _, x in steps) / count,
            size=sum(s for s, _, _ in steps) / count,
            idle_share=min(max(1.0 - busy / wall, 0.0), 1.0) if wall > 0 else 0.0)

    def _settled(self, span: _Span) -> None:
        self._period_busy += span.busy_s
        if span.size > 0:
            with self._lock:
                self._steps.append((span.size, span.busy_s, span.launch_s))
