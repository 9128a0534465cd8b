"""Channel rendezvous over a `TCPStore` hosted by the receiver.

A sender takes a channel number (`store.add`), writes its hello (wire version,
KV geometry, device), and waits for the receiver's verdict. The receiver's
listener thread polls for hellos, checks them, answers, and hands accepted ones
to its backend, which then builds the pair's process groups under the channel's
key prefix. Pairs come and go; the store and the other channels stay.
"""
from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from torch.distributed import PrefixStore, Store, TCPStore

from pdserve.engine.stores import ListenError, listening_store
from pdserve.engine.transfer.heads import KvShard
from pdserve.engine.transfer.messages import WIRE_VERSION, ChannelAddress, HandshakeError, KvGeometry, TransferError

log = logging.getLogger(__name__)

_NEXT_CHANNEL = "pdserve/next_channel"
_POLL_S = 0.02


@dataclass(frozen=True)
class Hello:
    """What a sender tells a receiver before any data (its checks are the receiver's)."""

    wire_version: int
    geometry: KvGeometry
    sender_id: str
    device_uuid: str  # "" on the CPU; cuda_ipc needs both ends on one GPU
    shard: KvShard  # the kv heads the sender's pool holds (TP)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Hello:
        raw = json.loads(text)
        return cls(raw["wire_version"], KvGeometry(**raw["geometry"]), raw["sender_id"], raw["device_uuid"],
                   KvShard(**raw["shard"]))


def channel_store(store: Store, channel: int) -> PrefixStore:
    """The key space of one channel, where its process groups meet."""
    return PrefixStore(f"pdserve/ch{channel}/", store)


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def connect(address: ChannelAddress, hello: Hello, timeout_s: float) -> tuple[PrefixStore, int]:
    """Register with the receiver at `address`; return the channel's store and number."""
    if address.wire_version != WIRE_VERSION:
        raise HandshakeError(f"receiver {address.peer_id} speaks wire v{address.wire_version}, we speak v{WIRE_VERSION}")
    try:
        store = TCPStore(address.host, address.port, is_master=False, timeout=_seconds(timeout_s), wait_for_workers=False)
        channel = store.add(_NEXT_CHANNEL, 1)
        store.set(f"pdserve/ch{channel}/hello", hello.to_json())
        store.wait([f"pdserve/ch{channel}/verdict"], _seconds(timeout_s))
        verdict = json.loads(store.get(f"pdserve/ch{channel}/verdict"))
    except Exception as e:  # the store raises several unrelated types for "not there"
        raise TransferError(f"cannot reach receiver {address.peer_id} at {address.host}:{address.port}: {e}") from e
    if verdict["error"]:
        raise HandshakeError(f"receiver {address.peer_id} refused the channel: {verdict['error']}")
    return channel_store(store, channel), channel


def check_hello(hello: Hello, geometry: KvGeometry) -> str:
    """Why the receiver refuses `hello`, or '' to accept."""
    if hello.wire_version != WIRE_VERSION:
        return f"wire version {hello.wire_version} != {WIRE_VERSION}"
    return hello.geometry.mismatch(geometry)


class ChannelListener:
    """The receiver's `TCPStore`, listening on `host`, and the thread that admits new senders."""

    def __init__(
        self,
        host: str,
        port: int,
        check: Callable[[Hello], str],
        on_accept: Callable[[PrefixStore, int, Hello], None],
        timeout_s: float,
    ):
        try:
            self._store = listening_store(host, port, timeout_s)
        except ListenError as e:
            raise TransferError(f"KV channels: {e}") from e
        self._check = check
        self._on_accept = on_accept
        self._timeout_s = timeout_s
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-listener", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._store.port

    def close(self) -> None:
        """Admit no one more; the store stops once the open channels let go of it too."""
        self._closed.set()
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._store = None

    def _run(self) -> None:
        next_channel = 1
        first_seen = time.monotonic()
        while not self._closed.wait(_POLL_S):
            if self._store.add(_NEXT_CHANNEL, 0) < next_channel:
                first_seen = time.monotonic()
                continue
            if self._store.check([f"pdserve/ch{next_channel}/hello"]):
                self._admit(next_channel)
            elif time.monotonic() - first_seen < self._timeout_s:
                continue  # the sender took the number and is about to write its hello
            else:
                log.warning("channel %d: sender never said hello; skipping it", next_channel)
            next_channel += 1
            first_seen = time.monotonic()

    def _admit(self, channel: int) -> None:
        hello = Hello.from_json(self._store.get(f"pdserve/ch{channel}/hello").decode())
        error = self._check(hello)
        self._store.set(f"pdserve/ch{channel}/verdict", json.dumps({"error": error}))
        if error:
            log.error("channel %d from %s refused: %s", channel, hello.sender_id, error)
            return
        log.info("channel %d: sender %s connected", channel, hello.sender_id)
        self._on_accept(channel_store(self._store, channel), channel, hello)
