"""Reserve calls by their call id, so that a router that gave up on one can still free what it held.

A router whose `Reserve` timed out (a slow link, a replica answering late) cannot
know whether the replica reserved: it sends `Release(call_id)`. If the call was
served, its reservation is freed; if it has not arrived yet, its id is remembered
and the call is refused when it does. Ids are kept `keep_s` seconds (a router
gives up within `RESERVE_TIMEOUT_S` and releases at once), so memory stays bounded.
"""
from __future__ import annotations

import time
from collections import OrderedDict

KEEP_S = 30.0


class ReserveCalls:
    def __init__(self, keep_s: float = KEEP_S):
        self.keep_s = keep_s
        self._served: OrderedDict[str, tuple[float, int]] = OrderedDict()  # call id: (when, transfer id)
        self._released: OrderedDict[str, float] = OrderedDict()  # call ids released before they came

    def served(self, call_id: str, transfer_id: int) -> None:
        self._forget_old()
        if call_id:
            self._served[call_id] = (time.monotonic(), transfer_id)

    def is_released(self, call_id: str) -> bool:
        """Whether a release of this call came first (the call must then reserve nothing)."""
        return bool(call_id) and self._released.pop(call_id, None) is not None

    def release(self, call_id: str) -> int | None:
        """The transfer id the call reserved; None if it has not come yet (it will be refused)."""
        self._forget_old()
        served = self._served.pop(call_id, None)
        if served is None:
            self._released[call_id] = time.monotonic()
            return None
        return served[1]

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.keep_s
        for entries in (self._served, self._released):
            while entries and _when(next(iter(entries.values()))) < horizon:
                entries.popitem(last=False)


def _when(entry: tuple[float, int] | float) -> float:
    return entry[0] if isinstance(entry, tuple) else entry
