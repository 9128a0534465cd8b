"""Pickled messages between pdserve's own processes, sealed with the application's call secret.

Some messages carry what only pickle spells (a CUDA IPC handle in a KV destination). A server
unpickles a payload only after its HMAC-SHA256 under the secret checks out, so a process that
can reach the port but not the secret (which travels in the application's config, through Ray)
cannot make it unpickle anything.
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any


class SealBroken(ValueError):
    """The payload was not sealed with this application's secret."""


def seal(message: Any, secret: str) -> tuple[bytes, bytes]:
    """`message` pickled, and its seal."""
    payload = pickle.dumps(message)
    return payload, _mac(payload, secret)


def unseal(payload: bytes, signature: bytes, secret: str) -> Any:
    if not hmac.compare_digest(_mac(payload, secret), signature):
        raise SealBroken("the call is not sealed with this application's secret")
    return pickle.loads(payload)


def _mac(payload: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), payload, hashlib.sha256).digest()
