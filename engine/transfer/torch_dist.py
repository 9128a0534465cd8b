"""The `gloo` (CPU) and `nccl` (GPU to GPU) backends: KV payloads over torch.distributed.

Per (sender, receiver) pair one 2-rank group, made on demand over the receiver's
`TCPStore` (no global `init_process_group`): replicas join and leave while the
others keep working. The two backends share every line but the data group's
constructor and the device the payload lives on.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from typing import Sequence

import torch
from torch.distributed import PrefixStore

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.base import KvReceiver, KvSender
from pdserve.engine.transfer.channel import ReceiveChannel, ReceiverFrameHandler, SendChannel
from pdserve.engine.transfer.heads import KvShard, delivered_heads
from pdserve.engine.transfer.ledger import LayerPiece
from pdserve.engine.transfer.messages import (
    WIRE_VERSION,
    AckStatus,
    ChannelAddress,
    Frame,
    KvDestination,
    MessageKind,
    TransferError,
)
from pdserve.engine.transfer.rendezvous import ChannelListener, Hello, check_hello

log = logging.getLogger(__name__)

_CLOSE_WAIT_S = 5.0


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID ('' on the CPU): device indices differ between processes, UUIDs do not."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def _finish_error(dest: KvDestination, receiver: str, status: AckStatus) -> TransferError:
    return TransferError(f"transfer {dest.transfer_id}: receiver {receiver} answered {status.name}")


class TorchDistReceiver(KvReceiver):
    """Receives over one channel per sender; the channel threads write into the pool."""

    backend = "gloo"

    def __init__(self, kv_cache: KvCache, host: str = "127.0.0.1", port: int = 0,
                 peer_id: str | None = None, timeout_s: float = 30.0, shard: KvShard | None = None):
        super().__init__(kv_cache, shard)
        self._host, self._timeout_s = host, timeout_s
        self._peer_id = peer_id or f"receiver-{uuid.uuid4().hex[:8]}"
        self._channels: dict[int, ReceiveChannel] = {}
        self._lock = threading.Lock()
        self._listener = ChannelListener(host, port, self._check, self._accept, timeout_s)

    @property
    def address(self) -> ChannelAddress:
        return ChannelAddress(self.backend, self._host, self._listener.port, self._peer_id, self.shard)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            channels = list(self._channels.values())
        for channel in channels:
            channel.say_goodbye(_CLOSE_WAIT_S)

    def _check(self, hello: Hello) -> str:
        error = check_hello(hello, self.geometry)
        if not error and not delivered_heads(hello.shard, self.shard):
            error = f"sender shard {hello.shard} holds none of this receiver's kv heads {self.shard.heads}"
        return error

    def _accept(self, store: PrefixStore, number: int, hello: Hello) -> None:
        heads = self.shard.local(delivered_heads(hello.shard, self.shard))  # what this channel carries
        with self._lock:
            self._channels[number] = ReceiveChannel(
                store, number, hello, self._ledger, self.kv_cache, self.backend, self._timeout_s, self._forget,
                self._host, heads, self._frame_handlers())

    def _frame_handlers(self) -> dict[MessageKind, ReceiverFrameHandler]:
        """This backend's own frame kinds, beyond what every channel carries (none here)."""
        return {}

    def _forget(self, channel: ReceiveChannel) -> None:
        with self._lock:
            self._channels.pop(channel.number, None)


class NcclReceiver(TorchDistReceiver):
    backend = "nccl"

    def _check(self, hello: Hello) -> str:
        mine = device_uuid(self.kv_cache.spec.device)
        if hello.device_uuid and hello.device_uuid == mine:
            # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") deep inside its first send.
            return (f"sender {hello.sender_id} is on this receiver's GPU ({mine}); nccl needs two GPUs: "
                    "give each replica a whole GPU, or set transfer.backend to cuda_ipc when all share one")
        return super()._check(hello)


class TorchDistSender(KvSender):
    """Sends to any receiver of its backend; one channel (and thread) per receiver, opened on demand."""

    backend = "gloo"

    def __init__(self, kv_cache: KvCache, sender_id: str | None = None, timeout_s: float = 30.0,
                 host: str | None = None, shard: KvShard | None = None):
        super().__init__(kv_cache, shard)
        self._timeout_s = timeout_s
        self._host = host  # the local address channels bind; None: the one that routes to each receiver
        sender_id = sender_id or f"sender-{uuid.uuid4().hex[:8]}"
        self._hello = Hello(WIRE_VERSION, self.geometry, sender_id, device_uuid(kv_cache.spec.device), self.shard)
        self._lock = threading.Lock()
        self._channels: dict[ChannelAddress, SendChannel] = {}
        # (receiver, transfer id) -> its channels (one per receiving rank, with the heads it gets) until finish
        self._bound: dict[tuple[str, int], list[tuple[SendChannel, range]]] = {}
        # pieces not yet flushed, per channel, each with the event its export recorded
        self._pending: dict[SendChannel, list[tuple[LayerPiece, torch.cuda.Event | None]]] = {}

    def connect(self, address: ChannelAddress, timeout_s: float) -> None:
        channel = self._channel(address)
        try:
            channel.connected.result(timeout_s)
        except TimeoutError as e:
            raise TransferError(f"no channel to {address.peer_id} after {timeout_s:.3g} s") from e

    def send_layer(self, dest: KvDestination, layer: int, src_block_ids: Sequence[int], first_block_index: int) -> None:
        self._check_range(dest, layer, src_block_ids, first_block_index)
        for channel, heads in self._bind(dest):
            # Snapshot now, on the caller's stream, so later compute cannot change what we send.
            payload = self.export(layer, src_block_ids, heads)
            piece = LayerPiece(dest.transfer_id, layer, first_block_index, payload)
            with self._lock:
                self._pending.setdefault(channel, []).append((piece, _record_event(payload.device)))
            channel.submit(functools.partial(self._flush, channel))

    def _flush(self, channel: SendChannel) -> None:
        """Send every piece queued for `channel` so far, in one LAYERS message (channel thread)."""
        with self._lock:
            queued = self._pending.pop(channel, [])
        if not queued:
            return  # an earlier flush took them
        for _, ready in queued:
            if ready is not None:
                ready.synchronize()
        pieces = [piece for piece, _ in queued]
        table = torch.tensor([[p.transfer_id, p.layer, p.first_block_index, p.data.shape[1]] for p in pieces],
                             dtype=torch.int64)
        payload = pieces[0].data if len(pieces) == 1 else torch.cat([p.data for p in pieces], dim=1)
        channel.send_pieces(table, payload)

    def finish(self, dest: KvDestination, num_blocks_total: int, timeout_s: float) -> None:
        routes = self._bind(dest)
        with self._lock:
            self._bound.pop(dest.key, None)
        replies = []
        for channel, _ in routes:
            replies.append((channel, channel.expect_reply(MessageKind.FINISHED, dest.transfer_id)))
            self._submit_finish(channel, Frame(MessageKind.FINISH, dest.transfer_id, num_blocks=num_blocks_total))
        deadline = time.monotonic() + timeout_s
        for channel, reply in replies:
            try:
                status = reply.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError as e:
                raise TransferError(f"transfer {dest.transfer_id}: not delivered after {timeout_s:.3g} s") from e
            if status != AckStatus.OK:
                raise _finish_error(dest, channel.address.peer_id, status)
        log.debug("transfer %d: delivered to %s", dest.transfer_id, dest.key[0])

    def _submit_finish(self, channel: SendChannel, frame: Frame) -> None:
        """Queue the FINISH frame after the transfer's pieces (a backend with more to say first overrides)."""
        channel.submit(functools.partial(channel.send_frame, frame))

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close(_CLOSE_WAIT_S)

    def _bind(self, dest: KvDestination) -> list[tuple[SendChannel, range]]:
        """The channels this transfer runs on, with the heads each carries: fixed at its first layer,
        so a broken one fails it whole."""
        with self._lock:
            routes = self._bound.get(dest.key)
            if routes is None:
                routes = [(self._channel_locked(address), heads) for address, heads in self.routes(dest)]
                self._bound[dest.key] = routes
            return routes

    def _channel(self, address: ChannelAddress) -> SendChannel:
        with self._lock:
            return self._channel_locked(address)

    def _channel_locked(self, address: ChannelAddress) -> SendChannel:
        if address.backend != self.backend:
            raise ValueError(f"a {self.backend} sender cannot reach a {address.backend} receiver")
        channel = self._channels.get(address)
        if channel is None or channel.is_broken:
            self._pending.pop(channel, None)  # a broken channel skips its queued flushes
            channel = self._channels[address] = self._open(address)
        return channel

    def _open(self, address: ChannelAddress) -> SendChannel:
        return SendChannel(address, self._hello, self.backend, self.kv_cache.spec.device, self._timeout_s,
                           host=self._host)


class NcclSender(TorchDistSender):
    backend = "nccl"


def _record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on `device`'s current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
