"""The two ends of the KV transfer plane: a receiver (decode side) and a sender (prefill side).

Receiver verbs: `address`, `expect`, `wait` (or `poll`), `cancel`, `close`.
Sender verbs: `connect`, `send_layer`, `finish`, `close`.
A transfer on the receiver: expect() before the sender starts; wait() returns an
outcome (a value, never an exception for transport failures) and forgets the
transfer; cancel() forgets it and guarantees no later write lands in its blocks.
"""
from __future__ import annotations

import abc
from typing import Hashable, Sequence

import torch

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.heads import KvShard, delivered_heads
from pdserve.engine.transfer.ledger import TransferLedger
from pdserve.engine.transfer.messages import ChannelAddress, KvDestination, KvGeometry, TransferOutcome


class KvReceiver(abc.ABC):
    """Owns one replica's (or one TP rank's) incoming channels; writes arriving blocks into its `KvCache`."""

    def __init__(self, kv_cache: KvCache, shard: KvShard | None = None):
        """`shard`: the kv heads this pool holds, when it is one TP rank's (None: all of them)."""
        self.kv_cache = kv_cache
        self.shard = shard or KvShard.whole(kv_cache.spec.num_kv_heads)
        self.geometry = KvGeometry.of(kv_cache, self.shard)
        self._ledger = TransferLedger(kv_cache)

    @property
    @abc.abstractmethod
    def address(self) -> ChannelAddress:
        """Where senders reach this receiver (goes into every `KvDestination`)."""

    def destination(self, transfer_id: int, block_ids: Sequence[int]) -> KvDestination:
        """The `KvDestination` to hand to a sender for these reserved blocks."""
        return KvDestination(transfer_id, tuple(block_ids), (self.address,))

    def expect(self, transfer_id: int, block_ids: Sequence[int], num_layers: int | None = None) -> None:
        """Accept data for `transfer_id` into `block_ids` (call before the sender starts)."""
        layers = self.kv_cache.spec.num_layers if num_layers is None else num_layers
        self._ledger.expect(transfer_id, tuple(block_ids), layers)

    def wait(self, transfer_id: int, timeout_s: float) -> TransferOutcome:
        """Block until the transfer landed whole or failed, at most `timeout_s`; then forget it."""
        outcome, writer = self._ledger.wait(transfer_id, timeout_s)
        if writer is not None and not outcome.is_ok:
            self._fence(writer, transfer_id)
        return outcome

    def poll(self, transfer_id: int) -> TransferOutcome | None:
        """The outcome once the transfer landed whole or failed (then forgotten); None while open."""
        outcome, writer = self._ledger.poll(transfer_id)
        if writer is not None and outcome is not None and not outcome.is_ok:
            self._fence(writer, transfer_id)
        return outcome

    def cancel(self, transfer_id: int) -> None:
        """Forget the transfer; on return no write into its blocks is in progress or will come."""
        writer = self._ledger.cancel(transfer_id)
        if writer is not None:
            self._fence(writer, transfer_id)

    def _fence(self, writer: Hashable, transfer_id: int) -> None:
        """Stop a peer that writes this pool directly (only cuda_ipc admits such writers)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Tell peers goodbye and stop every channel thread (bounded wait)."""


class KvSender(abc.ABC):
    """Pushes one replica's (or one TP rank's) KV blocks, layer by layer, to receivers it reaches on demand.

    Each receiver of a destination gets the heads this sender is the source of (heads.py);
    a destination's receivers this sender has nothing for are never contacted."""

    def __init__(self, kv_cache: KvCache, shard: KvShard | None = None):
        """`shard`: the kv heads this pool holds, when it is one TP rank's (None: all of them)."""
        self.kv_cache = kv_cache
        self.shard = shard or KvShard.whole(kv_cache.spec.num_kv_heads)
        self.geometry = KvGeometry.of(kv_cache, self.shard)

    def routes(self, dest: KvDestination) -> list[tuple[ChannelAddress, range]]:
        """The receivers of `dest` this sender sends to, each with the global heads it sends them."""
        routes = [(address, delivered_heads(self.shard, address.shard)) for address in dest.channels]
        return [(address, heads) for address, heads in routes if heads]

    def export(self, layer: int, src_block_ids: Sequence[int], heads: range) -> torch.Tensor:
        """A snapshot of one layer's blocks, of global `heads` only."""
        return self.kv_cache.export_blocks(layer, torch.tensor(src_block_ids, dtype=torch.int64),
                                           self.shard.local(heads))

    @abc.abstractmethod
    def connect(self, address: ChannelAddress, timeout_s: float) -> None:
        """Open (or reuse) the channel to `address` now; raises `TransferError`/`HandshakeError`."""

    @abc.abstractmethod
    def send_layer(
        self, dest: KvDestination, layer: int, src_block_ids: Sequence[int], first_block_index: int
    ) -> None:
        """Queue one layer's `src_block_ids` for `dest.block_ids[first_block_index:]`; returns at once."""

    @abc.abstractmethod
    def finish(self, dest: KvDestination, num_blocks_total: int, timeout_s: float) -> None:
        """Wait until the whole transfer (first `num_blocks_total` blocks, every layer) was delivered."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every channel (bounded wait)."""

    def _check_range(self, dest: KvDestination, layer: int, src_block_ids: Sequence[int], first: int) -> None:
        """Reject a call that could never be delivered (a bug in the caller, not a transport failure)."""
        if not 0 <= layer < self.kv_cache.spec.num_layers:
            raise ValueError(f"transfer {dest.transfer_id}: layer {layer} out of range")
        if not src_block_ids or first < 0 or first + len(src_block_ids) > len(dest.block_ids):
            raise ValueError(
                f"transfer {dest.transfer_id}: blocks [{first}, {first + len(src_block_ids)}) "
                f"outside its {len(dest.block_ids)} destination blocks"
            )
