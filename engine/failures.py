"""Why a request failed inside a worker: one code, carried as a value across every seam.

The workers end a request with a `FailureCode` (the decode stream carries its value);
the router maps each code to its HTTP and gRPC status once (router/generation.py).
Plain Python, so the router imports it without the engine's torch.
"""
from __future__ import annotations

import enum


class FailureCode(str, enum.Enum):
    DEADLINE = "deadline"  # the request's deadline passed
    TRANSFER_FAILED = "transfer_failed"  # the KV handoff failed: another pair may do
    INVALID = "invalid"  # the request cannot be served as asked
    UNAVAILABLE = "unavailable"  # the replica failed or is shutting down: another may do
    CANCELLED = "cancelled"  # the router or the client gave up on it
