"""The `cuda_ipc` backend: both replicas on one GPU; the sender writes the receiver's pool directly.

The receiver shares its whole KV tensor once (a CUDA IPC handle in its address);
each sender maps it once per receiver and copies blocks device to device on that
receiver's channel thread, whose own stream (`channel.own_stream`) waits for the
compute stream's event. Frames still travel over a small
gloo channel, because direct writes need a gate and a fence:
    BEGIN -> ADMITTED   the receiver still expects the transfer; only then do copies start
    CANCEL -> FENCED    the receiver's cancel waits until the sender stopped and synced
    LANDED..., FINISH   sent after the channel's stream synced, so "landed" is true
These frames are this backend's own: the receiver handles them (`_frame_handlers`), the
sender its CANCEL; the generic channel only carries them.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.multiprocessing.reductions import reduce_tensor

from pdserve.engine.copies import on_device
from pdserve.engine.kv_cache import KvCache, raw_bytes
from pdserve.engine.transfer.channel import ReceiveChannel, ReceiverFrameHandler, SendChannel
from pdserve.engine.transfer.messages import (
    AckStatus,
    ChannelAddress,
    Frame,
    KvDestination,
    MessageKind,
    TransferError,
)
from pdserve.engine.transfer.rendezvous import Hello
from pdserve.engine.transfer.torch_dist import TorchDistReceiver, TorchDistSender, device_uuid

log = logging.getLogger(__name__)

_DEVICE_ARG = 6  # position of the device index in reduce_tensor's rebuild arguments


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"cuda_ipc needs a KV cache on a CUDA device, not {device}")


@dataclass(frozen=True)
class CudaIpcHandle:
    """A receiver's KV tensor as a picklable CUDA IPC handle, tagged with its GPU."""

    device_uuid: str
    rebuild: Callable[..., torch.Tensor]
    rebuild_args: tuple[Any, ...]

    def open(self) -> torch.Tensor:
        """Map the tensor in this process (on whichever local index this GPU has here)."""
        index = next((i for i in range(torch.cuda.device_count())
                      if device_uuid(torch.device("cuda", i)) == self.device_uuid), None)
        if index is None:
            raise TransferError(f"GPU {self.device_uuid} is not visible to this process")
        args = list(self.rebuild_args)
        args[_DEVICE_ARG] = index
        # A normal tensor even when opened under inference mode (the prefill's layer hook):
        # the channel thread writes into it outside that mode.
        with torch.inference_mode(False):
            return self.rebuild(*args)


class CudaIpcReceiver(TorchDistReceiver):
    """Shares its pool with same-GPU senders; its channels carry frames only."""

    backend = "cuda_ipc"

    def __init__(self, kv_cache: KvCache, fence_timeout_s: float = 5.0, **kwargs: Any):
        _require_cuda(kv_cache.spec.device)
        super().__init__(kv_cache, **kwargs)
        self._fence_timeout_s = fence_timeout_s
        self._fences: dict[tuple[int, int], threading.Event] = {}  # (channel, transfer id) -> FENCED came
        self._fences_lock = threading.Lock()
        rebuild, args = reduce_tensor(kv_cache.tensor)
        self._handle = CudaIpcHandle(device_uuid(kv_cache.spec.device), rebuild, args)

    @property
    def address(self) -> ChannelAddress:
        plain = super().address
        return ChannelAddress(plain.backend, plain.host, plain.port, plain.peer_id, plain.shard,
                              ipc_handle=self._handle)

    def _frame_handlers(self) -> dict[MessageKind, ReceiverFrameHandler]:
        return {MessageKind.BEGIN: self._on_begin, MessageKind.LANDED: self._on_landed,
                MessageKind.LANDED_ALL_LAYERS: self._on_landed_all_layers, MessageKind.FENCED: self._on_fenced}

    def _on_begin(self, channel: ReceiveChannel, frame: Frame) -> None:
        """The gate: the sender may write only a transfer this pool still expects."""
        channel.track(frame.transfer_id)
        channel.reply(MessageKind.ADMITTED, frame.transfer_id, self._ledger.admit(frame.transfer_id, channel))

    def _on_landed(self, channel: ReceiveChannel, frame: Frame) -> None:
        self._ledger.mark_landed(frame.transfer_id, frame.layer, frame.first_block_index, frame.num_blocks)

    def _on_landed_all_layers(self, channel: ReceiveChannel, frame: Frame) -> None:
        for layer in range(self.kv_cache.spec.num_layers):
            self._ledger.mark_landed(frame.transfer_id, layer, frame.first_block_index, frame.num_blocks)

    def _on_fenced(self, channel: ReceiveChannel, frame: Frame) -> None:
        with self._fences_lock:
            event = self._fences.get((channel.number, frame.transfer_id))
        if event is not None:
            event.set()

    def _fence(self, writer: ReceiveChannel, transfer_id: int) -> None:
        """Make the sender stop writing `transfer_id` and wait until it says so; raises `TransferError`
        (blocks unsafe) if it never does. A channel already gone writes nothing more."""
        key, event = (writer.number, transfer_id), threading.Event()
        with self._fences_lock:
            self._fences[key] = event
        try:
            writer.reply(MessageKind.CANCEL, transfer_id)
            confirmed = event.wait(self._fence_timeout_s) or not writer.is_alive
        except Exception as e:
            log.warning("transfer %d: cannot fence channel %d: %s", transfer_id, writer.number, e)
            confirmed = not writer.is_alive
        finally:
            with self._fences_lock:
                self._fences.pop(key, None)
        if not confirmed:
            raise TransferError(f"transfer {transfer_id}: sender did not confirm it stopped writing; "
                                "do not reuse its blocks")

    def _check(self, hello: Hello) -> str:
        if hello.device_uuid != self._handle.device_uuid:
            return f"sender is on GPU {hello.device_uuid or 'cpu'}, receiver on {self._handle.device_uuid}"
        if hello.shard.size != 1 or self.shard.size != 1:
            return "cuda_ipc moves whole pools on one GPU; TP replicas (several GPUs) use nccl"
        return super()._check(hello)


@dataclass
class _Peer:
    """One receiver as this sender sees it: its mapped pool, the state of transfers.

    Touched on the channel thread only, where copies run on its own stream (`_copy_stream`).
    Nothing there waits for the receiver, and a transfer's report waits for that transfer's own
    copies (`copied`), never for copies of transfers queued after it."""

    channel: SendChannel
    remote: torch.Tensor
    admitted: dict[int, bool] = field(default_factory=dict)  # transfer id -> may write
    held: dict[int, list[Callable[[], None]]] = field(default_factory=dict)  # its work waiting for ADMITTED
    ranges: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # (layer, first, n) copied
    copied: dict[int, torch.cuda.Event] = field(default_factory=dict)  # recorded after its last copy
    # A push's (source, destination) block ids on the GPU, by (first block index, blocks): made once
    # for all its layers, since each upload goes through pinned memory the host allocator may have to make
    indices: dict[int, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class CudaIpcSender(TorchDistSender):
    """Copies blocks into same-GPU receivers' pools; one channel thread per receiver orders the work."""

    backend = "cuda_ipc"

    def __init__(self, kv_cache: KvCache, **kwargs: Any):
        _require_cuda(kv_cache.spec.device)
        super().__init__(kv_cache, **kwargs)
        self._peers: dict[SendChannel, _Peer] = {}

    def send_layer(self, dest: KvDestination, layer: int, src_block_ids: Sequence[int], first_block_index: int) -> None:
        self._check_range(dest, layer, src_block_ids, first_block_index)
        (channel, _), = self._bind(dest)  # one receiver, every head (TP replicas are refused)
        peer = self._peers[channel]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.kv_cache.spec.device))
        tid, n = dest.transfer_id, len(src_block_ids)

        def copy() -> None:
            if not peer.admitted[tid]:
                return  # the receiver no longer wants it (cancelled, timed out) or fenced it
            stream = self._copy_stream()
            stream.wait_event(ready)
            src_ids, dst_ids = self._indices(peer, dest, src_block_ids, first_block_index)
            src = raw_bytes(self.kv_cache.layer(layer)).index_select(1, src_ids)
            raw_bytes(peer.remote[layer]).index_copy_(1, dst_ids, src)
            peer.ranges.setdefault(tid, []).append((layer, first_block_index, n))
            peer.copied[tid] = torch.cuda.Event()
            peer.copied[tid].record(stream)

        peer.channel.submit(lambda: self._once_admitted(peer, tid, copy))

    def _submit_finish(self, channel: SendChannel, frame: Frame) -> None:
        """LANDED frames, then FINISH: after the transfer's copies, once they are in the receiver's pool."""
        peer, tid = self._peers[channel], frame.transfer_id

        def report() -> None:
            copied = peer.copied.pop(tid, None)
            if copied is not None:
                copied.synchronize()
            for landed in _landed_frames(tid, peer.ranges.pop(tid, []), self.kv_cache.spec.num_layers):
                peer.channel.send_frame(landed)
            peer.admitted.pop(tid, None)
            peer.indices.pop(tid, None)
            peer.channel.send_frame(frame)

        channel.submit(lambda: self._once_admitted(peer, tid, report))

    def _indices(self, peer: _Peer, dest: KvDestination, src_block_ids: Sequence[int],
                 first_block_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A push's source and destination block ids on the GPU (channel thread)."""
        n, device = len(src_block_ids), self.kv_cache.spec.device
        pushes = peer.indices.setdefault(dest.transfer_id, {})
        if (first_block_index, n) not in pushes:
            dst_block_ids = dest.block_ids[first_block_index : first_block_index + n]
            pushes[(first_block_index, n)] = (on_device(list(src_block_ids), torch.long, device),
                                              on_device(list(dst_block_ids), torch.long, device))
        return pushes[(first_block_index, n)]

    def _once_admitted(self, peer: _Peer, transfer_id: int, work: Callable[[], None]) -> None:
        """Run `work` once the receiver answered the transfer's BEGIN (channel thread). A transfer's
        first work sends BEGIN; it and what follows are held while other transfers' work goes on."""
        if transfer_id in peer.admitted:
            work()
            return
        if transfer_id not in peer.held:
            peer.held[transfer_id] = []
            answer = peer.channel.expect_reply(MessageKind.ADMITTED, transfer_id)
            peer.channel.send_frame(Frame(MessageKind.BEGIN, transfer_id))
            # Set on the reply thread, which submits this before any later CANCEL of the transfer.
            answer.add_done_callback(lambda _: peer.channel.submit(lambda: self._release(peer, transfer_id, answer)))
        peer.held[transfer_id].append(work)

    def _release(self, peer: _Peer, transfer_id: int, answer: Future) -> None:
        """BEGIN was answered: whether the transfer may be written, then its held work in order."""
        peer.admitted[transfer_id] = answer.exception() is None and answer.result() == AckStatus.ACCEPTED
        for work in peer.held.pop(transfer_id, []):
            work()

    def _stop_writing(self, peer: _Peer, transfer_id: int) -> None:
        """The receiver cancelled: stop writing, wait for copies in flight, confirm (channel thread)."""
        peer.admitted[transfer_id] = False
        peer.ranges.pop(transfer_id, None)
        self._copy_stream().synchronize()
        peer.channel.send_frame(Frame(MessageKind.FENCED, transfer_id))

    def _copy_stream(self) -> torch.cuda.Stream:
        """The calling channel thread's own stream, where its copies run (channel thread only)."""
        return torch.cuda.current_stream(self.kv_cache.spec.device)

    def _open(self, address: ChannelAddress) -> SendChannel:
        if not isinstance(address.ipc_handle, CudaIpcHandle):
            raise ValueError(f"receiver {address.peer_id} has no CUDA IPC handle")
        for broken in [c for c in self._peers if c.is_broken]:
            del self._peers[broken]
        holder: list[_Peer] = []
        # CANCEL arrives on the reply thread; the fence runs on the channel thread, after queued copies.
        def on_cancel(frame: Frame) -> None:
            channel.submit(lambda: self._stop_writing(holder[0], frame.transfer_id))

        channel = SendChannel(address, self._hello, self.backend, self.kv_cache.spec.device, self._timeout_s,
                              handlers={MessageKind.CANCEL: on_cancel})
        peer = _Peer(channel, address.ipc_handle.open())
        holder.append(peer)
        self._peers[channel] = peer
        return channel


def _landed_frames(transfer_id: int, ranges: list[tuple[int, int, int]], num_layers: int) -> list[Frame]:
    """LANDED frames for (layer, first, n) ranges: one per block range that every layer covers.

    Each frame is a round trip on the control channel; one per layer cost milliseconds.
    """
    layers_of: dict[tuple[int, int], set[int]] = {}
    for layer, first, n in ranges:
        layers_of.setdefault((first, n), set()).add(layer)
    frames = []
    for (first, n), layers in layers_of.items():
        if len(layers) == num_layers:
            frames.append(Frame(MessageKind.LANDED_ALL_LAYERS, transfer_id, 0, first, n))
        else:
            frames += [Frame(MessageKind.LANDED, transfer_id, layer, first, n) for layer in sorted(layers)]
    return frames
