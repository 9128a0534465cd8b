"""The `fake` backend: both ends in one process, found through a registry by address.

Delivery is synchronous (send_layer writes straight into the receiver's pool),
which makes worker tests deterministic. `FaultInjection` fails chosen transfers:
the receiver's wait then returns a CHANNEL_ERROR outcome and the sender's finish
raises `TransferError`, as a broken real channel would.
"""
from __future__ import annotations

import itertools
import logging
import random
import threading
from dataclasses import dataclass
from typing import Sequence

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.base import KvReceiver, KvSender
from pdserve.engine.transfer.heads import KvShard
from pdserve.engine.transfer.ledger import LayerPiece
from pdserve.engine.transfer.messages import (
    AckStatus,
    ChannelAddress,
    FailureReason,
    HandshakeError,
    KvDestination,
    TransferError,
)

log = logging.getLogger(__name__)

_registry: dict[int, FakeReceiver] = {}
_registry_lock = threading.Lock()
_ports = itertools.count(1)


@dataclass(frozen=True)
class FaultInjection:
    """Which transfers a fake sender fails: each with `failure_probability`, and the `fail_nth` (1-based)."""

    failure_probability: float = 0.0
    fail_nth: frozenset[int] = frozenset()
    seed: int = 0


class FakeReceiver(KvReceiver):
    """A receiver reachable by in-process fake senders."""

    def __init__(self, kv_cache: KvCache, peer_id: str | None = None, shard: KvShard | None = None):
        super().__init__(kv_cache, shard)
        port = next(_ports)
        self._address = ChannelAddress("fake", "in-process", port, peer_id or f"fake-receiver-{port}", self.shard)
        with _registry_lock:
            _registry[port] = self

    @property
    def address(self) -> ChannelAddress:
        return self._address

    def close(self) -> None:
        with _registry_lock:
            _registry.pop(self._address.port, None)


class FakeSender(KvSender):
    """Writes straight into the registered receiver's pool, failing the transfers `faults` picks."""

    def __init__(self, kv_cache: KvCache, faults: FaultInjection = FaultInjection(), shard: KvShard | None = None):
        super().__init__(kv_cache, shard)
        self._faults = faults
        self._random = random.Random(faults.seed)
        self._num_started = 0
        self._failed: dict[tuple[str, int], str] = {}  # (receiver, transfer id) -> why, until finish
        self._started: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def connect(self, address: ChannelAddress, timeout_s: float) -> None:
        self._receiver(address)

    def send_layer(self, dest: KvDestination, layer: int, src_block_ids: Sequence[int], first_block_index: int) -> None:
        self._check_range(dest, layer, src_block_ids, first_block_index)
        self._start(dest)
        with self._lock:
            if dest.key in self._failed:
                return
        try:
            for address, heads in self.routes(dest):
                receiver = self._receiver(address)
                piece = LayerPiece(dest.transfer_id, layer, first_block_index,
                                   self.export(layer, src_block_ids, heads), receiver.shard.local(heads))
                receiver._ledger.write([piece])
        except TransferError as e:
            with self._lock:
                self._failed[dest.key] = str(e)

    def finish(self, dest: KvDestination, num_blocks_total: int, timeout_s: float) -> None:
        self._start(dest)
        with self._lock:
            self._started.discard(dest.key)
            failure = self._failed.pop(dest.key, "")
        if failure:
            raise TransferError(f"transfer {dest.transfer_id}: {failure}")
        for address, heads in self.routes(dest):
            receiver = self._receiver(address)
            status = receiver._ledger.finish(dest.transfer_id, num_blocks_total, receiver.shard.local(heads))
            if status != AckStatus.OK:
                raise TransferError(f"transfer {dest.transfer_id}: receiver {address.peer_id} answered {status.name}")

    def close(self) -> None:
        with self._lock:
            self._failed.clear()
            self._started.clear()

    def _start(self, dest: KvDestination) -> None:
        """Count a new transfer and decide whether the fault plan fails it."""
        with self._lock:
            if dest.key in self._started:
                return
            self._started.add(dest.key)
            self._num_started += 1
            is_picked = self._num_started in self._faults.fail_nth
            if not (is_picked or self._random.random() < self._faults.failure_probability):
                return
            detail = f"injected fault (transfer #{self._num_started} of this sender)"
            self._failed[dest.key] = detail
        log.info("transfer %d: %s", dest.transfer_id, detail)
        for address, _ in self.routes(dest):
            with _registry_lock:
                receiver = _registry.get(address.port)
            if receiver is not None:
                receiver._ledger.fail([dest.transfer_id], FailureReason.CHANNEL_ERROR, detail)

    def _receiver(self, address: ChannelAddress) -> FakeReceiver:
        with _registry_lock:
            receiver = _registry.get(address.port)
        if receiver is None:
            raise TransferError(f"fake receiver {address.peer_id} is gone")
        mismatch = self.geometry.mismatch(receiver.geometry)
        if mismatch:
            raise HandshakeError(f"receiver {address.peer_id} refused the channel: {mismatch}")
        return receiver
