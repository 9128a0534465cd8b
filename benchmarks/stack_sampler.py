"""Where a process's Python threads spend their time: every thread's innermost frames, sampled.

    with StackSampler() as sampler:
        ...
    Path("stacks.txt").write_text(sampler.report())

A sample needs the GIL, so a thread that holds it inside C for long shows as fewer samples
over the same wall time (the report gives samples taken against samples expected).
"""
from __future__ import annotations

import collections
import sys
import threading
import time


class StackSampler:
    def __init__(self, interval_s: float = 0.001, depth: int = 6):
        self._interval_s, self._depth = interval_s, depth
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._samples, self._started = 0, 0.0

    def __enter__(self) -> "StackSampler":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._elapsed = time.monotonic() - self._started

    def _run(self) -> None:
        names = {}
        while not self._stop.wait(self._interval_s):
            self._samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == self._thread.ident:
                    continue
                if ident not in names:
                    names = {t.ident: t.name for t in threading.enumerate()}
                self._counts[(names.get(ident, str(ident)), self._frames(frame))] += 1

    def _frames(self, frame) -> str:
        parts = []
        while frame is not None and len(parts) < self._depth:
            code = frame.f_code
            parts.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        return " < ".join(parts)

    def report(self, top: int = 40) -> str:
        expected = self._elapsed / self._interval_s
        lines = [f"{self._samples} samples over {self._elapsed:.1f} s ({expected:.0f} expected at "
                 f"{1e3 * self._interval_s:.1f} ms); per thread and innermost frames:"]
        for (thread, frames), n in self._counts.most_common(top):
            lines.append(f"{n:6d} {100 * n / max(self._samples, 1):5.1f}%  [{thread}] {frames}")
        return "\n".join(lines) + "\n"
