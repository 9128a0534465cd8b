"""How busy the device is while an engine loop runs: its busy time per step beside the step's wall time.

An engine loop (the decode worker's steps, the prefill worker's batches) brackets the
device work it launches with `work()`, calls `step_done()` when it has read a step's
results, and `waiting()` when it has nothing to do:

    with clock.work(batch_size):      # launch the forward and sampling
        pending = runner.decode_and_sample(...)
    ...
    pending.result(); clock.step_done()

- Busy time: on CUDA, timing events recorded on the clock's device's current stream
  (the stream the loop launches on, graph replays included) around the launched work,
  read once they completed, never waited for; on the CPU the work runs inside the call,
  and the call's time is the busy time.
- Wall time: the loop's step period, from the previous `step_done` (or the first work
  after a `waiting`) to this one. Wall minus busy is host time the device did not
  hide: the loop's Python, emitting tokens, locks, waiting on other threads.
- Launch time (devices only): the host's time inside the `work()` bracket. The device is timed from
  the bracket's start, so a step whose kernels wait for Python to launch them (eager,
  no CUDA graph) reads busy; busy close to its launch time says so.

A period enters the window once every span launched in it has settled (its end event
completed); a loop one step ahead settles each period at the next `step_done`. Periods
whose events never complete are dropped past `MAX_UNSETTLED` (counted in `num_lost`):
the window then holds nothing rather than idle time nobody measured.

`times()` gives means over the recent window and the idle share, 1 - busy / wall.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch

WINDOW_STEPS = 64
MAX_UNSETTLED = 256  # closed periods waiting for their events; a loop one step ahead holds one or two


class DeviceEvent(Protocol):
    """A recorded timing event (torch.cuda.Event's two reads the clock uses)."""

    def query(self) -> bool: ...
    def elapsed_time(self, end: "DeviceEvent") -> float: ...  # milliseconds from this event to `end`


Mark = Callable[[], DeviceEvent]  # records a timing event where the loop's device work is queued


def cuda_mark(device: torch.device) -> Mark:
    """Timing events on `device`'s current stream, whichever device the calling thread has current."""
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return mark


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
    num_lost: int = 0  # periods dropped because their events never completed (since start)

    @property
    def host_s(self) -> float:
        """Host time per step the device did not hide."""
        return max(self.wall_s - self.busy_s, 0.0)


@dataclass
class _Span:
    size: int
    launch_s: float
    start: DeviceEvent | None = None
    end: DeviceEvent | None = None
    busy_s: float | None = None  # known at once on the CPU; on a device once `end` completed

    def settle(self) -> bool:
        """Whether the span's device time is known (reading it now if its end event completed)."""
        if self.busy_s is None and self.end.query():
            self.busy_s = self.start.elapsed_time(self.end) / 1e3
        return self.busy_s is not None


@dataclass
class _Period:
    wall_s: float
    spans: list[_Span] = field(default_factory=list)


class StepClock:
    def __init__(self, device: torch.device, window: int = WINDOW_STEPS, mark: Mark | None = None):
        """`mark`: records the device's timing events (CUDA: `cuda_mark(device)`); None on the CPU."""
        self._mark = mark if mark is not None else cuda_mark(device) if device.type == "cuda" else None
        self._lock = threading.Lock()
        self._period_start: float | None = None
        self._spans: list[_Span] = []  # launched in the period under way
        self._unsettled: deque[_Period] = deque()  # closed periods, oldest first, some span not settled yet
        self._num_lost = 0
        self._periods: deque[tuple[float, float]] = deque(maxlen=window)  # (wall, busy)
        self._steps: deque[tuple[int, float, float]] = deque(maxlen=window)  # (size, busy, launch) of sized work

    @contextmanager
    def work(self, size: int = 0) -> Iterator[None]:
        """Bracket launching device work; `size` > 0 makes it a step point (batch size, tokens)."""
        now = time.perf_counter()
        if self._period_start is None:
            self._period_start = now
        start = self._mark() if self._mark is not None else None
        yield
        launch_s = time.perf_counter() - now
        if self._mark is None:
            self._spans.append(_Span(size, 0.0, busy_s=launch_s))
        else:
            self._spans.append(_Span(size, launch_s, start, self._mark()))

    def step_done(self) -> None:
        """The loop read a step's results: one wall period ends (call on the loop's thread)."""
        now = time.perf_counter()
        if self._period_start is not None:
            self._close(now)
            self._period_start = now
        self._settle()

    def waiting(self) -> None:
        """The loop has nothing to do: time until its next work is nobody's."""
        if self._spans:  # work launched since the last step_done still counts, over the period until now
            self._close(time.perf_counter())
        self._period_start = None
        self._settle()

    def times(self) -> StepTimes:
        with self._lock:
            periods, steps, lost = list(self._periods), list(self._steps), self._num_lost
        wall, busy = sum(w for w, _ in periods), sum(b for _, b in periods)
        n, count = len(periods) or 1, len(steps) or 1
        return StepTimes(
            num_steps=len(periods), wall_s=wall / n, busy_s=busy / n,
            step_busy_s=sum(b for _, b, _ in steps) / count, launch_s=sum(x for _, _, x in steps) / count,
            size=sum(s for s, _, _ in steps) / count,
            idle_share=min(max(1.0 - busy / wall, 0.0), 1.0) if wall > 0 else 0.0, num_lost=lost)

    def _close(self, now: float) -> None:
        self._unsettled.append(_Period(now - (self._period_start or now), self._spans))
        self._spans = []
        while len(self._unsettled) > MAX_UNSETTLED:  # events that never complete must not grow the host's memory
            self._unsettled.popleft()
            with self._lock:
                self._num_lost += 1

    def _settle(self) -> None:
        """Move closed periods whose spans all settled into the window, oldest first (device order)."""
        while self._unsettled and all(span.settle() for span in self._unsettled[0].spans):
            period = self._unsettled.popleft()
            with self._lock:
                self._periods.append((period.wall_s, sum(s.busy_s for s in period.spans)))
                self._steps.extend((s.size, s.busy_s, s.launch_s) for s in period.spans if s.size > 0)


def batch_rate(batches: Iterable[tuple[int, float]]) -> float:
    """Tokens per second over (tokens, seconds) batches; 0 with none."""
    batches = list(batches)
    seconds = sum(s for _, s in batches)
    return sum(t for t, _ in batches) / seconds if seconds > 0 else 0.0
