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
        # call id: (when, the transfer it reserved, or None: released before it came), oldest first
        self._calls: OrderedDict[str, tuple[float, int | None]] = OrderedDict()

    def served(self, call_id: str, transfer_id: int) -> None:
        self._forget_old()
        if call_id:
            self._calls[call_id] = (time.monotonic(), transfer_id)

    def is_released(self, call_id: str) -> bool:
        """Whether a release of this call came first (the call must then reserve nothing)."""
        if call_id in self._calls and self._calls[call_id][1] is None:
            del self._calls[call_id]
            return True
        return False

    def release(self, call_id: str) -> int | None:
        """The transfer id the call reserved; None if it has not come yet (it will be refused)."""
        self._forget_old()
        _, transfer_id = self._calls.pop(call_id, (0.0, None))
        if transfer_id is None:
            self._calls[call_id] = (time.monotonic(), None)
        return transfer_id

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.keep_s
        while self._calls and next(iter(self._calls.values()))[0] < horizon:
            self._calls.popitem(last=False)
