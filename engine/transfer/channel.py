"""One sender-receiver pair: two ranks of torch.distributed process groups, made on demand.

Frames (`messages.Frame`, int64[6]) always travel over a 2-rank gloo group: tag 0
sender to receiver, tag 1 receiver to sender. A LAYERS frame carries every layer
piece queued since the last one (a table, then one payload), so a sender that
falls behind catches up in one round trip, not one per layer. Payloads travel
over the data group: the same gloo group (CPU), an NCCL group (GPUs), or
none (cuda_ipc writes directly). Each direction of each group has one thread
that sends and one that receives, so messages stay in order and NCCL never sees
two operations in flight on one side.

Threads: the receiver runs `ReceiveChannel` (builds the groups, then reads
frames); the sender runs `SendChannel` (connects, then works its queue in
order) plus a reply reader. Rank 0 is the receiver, rank 1 the sender.

The channel itself knows the frames every backend sends (LAYERS, FINISH, CLOSE;
replies to a registered wait); a backend with frames of its own (cuda_ipc's
gate and fence) hands each end its handlers, by kind.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from pdserve.engine.kv_cache import KvCache, raw_bytes
from pdserve.engine.transfer.addresses import address_toward
from pdserve.engine.transfer.ledger import ALL_HEADS, LayerPiece, TransferLedger
from pdserve.engine.transfer.messages import (
    AckStatus,
    ChannelAddress,
    FailureReason,
    Frame,
    MessageKind,
    TransferError,
)
from pdserve.engine.transfer.nccl_env import keep_process_on_nccl_error, point_nccl_at
from pdserve.engine.transfer.rendezvous import Hello, connect

log = logging.getLogger(__name__)

RECEIVER, SENDER = 0, 1
TAG_FORWARD, TAG_REPLY = 0, 1
PIECE_COLUMNS = 4  # a LAYERS table row: transfer id, layer, first block index, number of blocks
# Receive waits for the next frame have no deadline: an idle channel is healthy, a
# dead peer breaks the socket at once, and each transfer's wait has its own deadline.
# (A gloo recv that times out poisons the whole group, so it must never time out.)
_IDLE_FOREVER = datetime.timedelta(days=365)

# A backend's own frames: on the receiver, a forward frame and the channel it came on
# (on the channel's thread); on the sender, a reply frame (on the reply thread).
ReceiverFrameHandler = Callable[["ReceiveChannel", Frame], None]
SenderFrameHandler = Callable[[Frame], None]


@dataclass
class ProcessGroupPair:
    """The groups of one channel: frames always over gloo, payloads over `data` (or none)."""

    control: dist.ProcessGroup
    data: dist.ProcessGroup | None
    peer: int
    op_timeout: datetime.timedelta

    def send_frame(self, frame: Frame, tag: int) -> None:
        self.control.send([frame.to_tensor()], self.peer, tag).wait(self.op_timeout)

    def recv_frame(self, tag: int) -> Frame:
        buf = torch.empty(Frame.SIZE, dtype=torch.int64)
        self.control.recv([buf], self.peer, tag).wait(_IDLE_FOREVER)
        return Frame.from_tensor(buf)

    def send_table(self, table: torch.Tensor) -> None:
        self.control.send([table], self.peer, TAG_FORWARD).wait(self.op_timeout)

    def recv_table(self, rows: int) -> torch.Tensor:
        table = torch.empty((rows, PIECE_COLUMNS), dtype=torch.int64)
        self.control.recv([table], self.peer, TAG_FORWARD).wait(self.op_timeout)
        return table

    def send_payload(self, payload: torch.Tensor) -> None:
        self.data.send([raw_bytes(payload)], self.peer, TAG_FORWARD).wait(self.op_timeout)

    def recv_payload(self, buf: torch.Tensor) -> None:
        self.data.recv([raw_bytes(buf)], self.peer, TAG_FORWARD).wait(self.op_timeout)


def own_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """A channel thread's own CUDA stream (nothing on the CPU).

    On the device's shared default stream, NCCL would wait for the compute queued
    there (prefill layers, decode steps) before moving a payload, and a landed-check
    would wait for it too; the channel's blocks are touched by nobody else meanwhile.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    if device.index is None:  # "cuda": the GPU current now (set_device wants an index)
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return torch.cuda.stream(torch.cuda.Stream(device))


def _gloo_options(host: str, timeout: datetime.timedelta) -> dist.ProcessGroupGloo._Options:
    """Gloo bound to `host`: the address it listens on and tells the peer (not the hostname's)."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return options


def open_pair(store: PrefixStore, rank: int, data_backend: str, timeout_s: float, host: str) -> ProcessGroupPair:
    """Build this end's groups on local address `host`; blocks until the peer builds its end (at most `timeout_s`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    control = dist.ProcessGroupGloo(PrefixStore("control/", store), rank, 2, _gloo_options(host, timeout))
    if data_backend == "gloo":
        data = control
    elif data_backend == "nccl":
        if not dist.is_nccl_available():
            raise TransferError("the nccl backend needs a CUDA build of torch")
        keep_process_on_nccl_error()
        point_nccl_at(host)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        data = dist.ProcessGroupNCCL(PrefixStore("nccl/", store), rank, 2, options)
    else:
        data = None
    return ProcessGroupPair(control, data, 1 - rank, timeout)


class ReceiveChannel:
    """The receiver's end of one channel: a thread that applies frames to the ledger."""

    def __init__(self, store: PrefixStore, number: int, hello: Hello, ledger: TransferLedger, kv_cache: KvCache,
                 data_backend: str, timeout_s: float, on_exit: Callable[[ReceiveChannel], None], host: str,
                 heads: slice = ALL_HEADS, handlers: Mapping[MessageKind, ReceiverFrameHandler] | None = None):
        """`heads`: where on the pool's head axis this sender's heads go (all at TP 1);
        `handlers`: the backend's own frame kinds."""
        self.number = number
        self._host = host
        self._heads = heads
        self.sender_id = hello.sender_id
        self._store, self._ledger, self._kv = store, ledger, kv_cache
        self._data_backend, self._timeout_s, self._on_exit = data_backend, timeout_s, on_exit
        self._pair: ProcessGroupPair | None = None
        self._handlers = dict(handlers or {})
        self._open_transfers: set[int] = set()  # transfers this sender touched, not finished
        # A gloo send waits for the peer's matching recv: the sender reads replies until the
        # first GOODBYE only, so exactly one GOODBYE may ever be sent.
        self._goodbye_lock = threading.Lock()
        self._has_said_goodbye = False
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-ch{number}", daemon=True)
        self._thread.start()

    def say_goodbye(self, timeout_s: float) -> None:
        """Ask the sender to close; its CLOSE ends our thread (bounded wait)."""
        try:
            self._say_goodbye()
        except Exception as e:  # the peer may already be gone; the thread then ends by itself
            log.debug("channel %d: goodbye not delivered: %s", self.number, e)
        self._thread.join(timeout_s)

    def _say_goodbye(self) -> None:
        with self._goodbye_lock:
            pair, was_said, self._has_said_goodbye = self._pair, self._has_said_goodbye, True
        if pair is not None and not was_said:
            pair.send_frame(Frame(MessageKind.GOODBYE, 0), TAG_REPLY)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def track(self, transfer_id: int) -> None:
        """This sender touched `transfer_id`: the channel breaking fails it."""
        self._open_transfers.add(transfer_id)

    def reply(self, kind: MessageKind, transfer_id: int, status: AckStatus = AckStatus.ACCEPTED) -> None:
        """Send the sender a reply frame (any thread; nothing once GOODBYE was said)."""
        if self._has_said_goodbye:
            return  # the sender stopped reading replies; it fails its own waits
        self._pair.send_frame(Frame(kind, transfer_id, status=int(status)), TAG_REPLY)

    def _run(self) -> None:
        try:
            self._pair = open_pair(self._store, RECEIVER, self._data_backend, self._timeout_s, self._host)
            self._store = None  # only the groups need it now; a closed receiver's store must be able to stop
            with own_stream(self._kv.tensor.device):
                while self._handle(self._pair.recv_frame(TAG_FORWARD)):
                    pass
            log.info("channel %d: sender %s closed", self.number, self.sender_id)
        except Exception as e:
            detail = f"channel {self.number} to sender {self.sender_id} broke: {e}"
            log.warning("%s", detail)
            self._ledger.fail(list(self._open_transfers), FailureReason.PEER_GONE, detail)
        finally:
            self._pair = None  # destroy the groups now, not in interpreter teardown
            self._on_exit(self)

    def _handle(self, frame: Frame) -> bool:
        """Apply one frame; False when the channel ends."""
        tid = frame.transfer_id
        if frame.kind == MessageKind.LAYERS:
            self._receive_layers(frame.num_blocks)
        elif frame.kind == MessageKind.FINISH:
            self._open_transfers.discard(tid)
            self.reply(MessageKind.FINISHED, tid, self._ledger.finish(tid, frame.num_blocks, self._heads))
        elif frame.kind == MessageKind.CLOSE:
            self._say_goodbye()
            return False
        elif frame.kind in self._handlers:
            self._handlers[frame.kind](self, frame)
        else:
            log.warning("channel %d: sender %s sent an unexpected %s frame; ignored",
                        self.number, self.sender_id, frame.kind.name)
        return True

    def _receive_layers(self, num_pieces: int) -> None:
        table = self._pair.recv_table(num_pieces).tolist()
        spec = self._kv.spec
        num_heads = len(range(spec.num_kv_heads)[self._heads])
        buf = torch.empty((2, sum(row[3] for row in table), spec.block_size, num_heads, spec.head_dim),
                          dtype=spec.dtype, device=spec.device)
        self._pair.recv_payload(buf)
        pieces, start = [], 0
        for tid, layer, first, n in table:
            self._open_transfers.add(tid)
            pieces.append(LayerPiece(tid, layer, first, buf[:, start : start + n], self._heads))
            start += n
        self._ledger.write(pieces)


class SendChannel:
    """The sender's end of one channel: an ordered work queue on one thread, plus a reply reader."""

    _CLOSE = object()  # queue marker: say CLOSE (if still possible) and stop

    def __init__(self, address: ChannelAddress, hello: Hello, data_backend: str, device: torch.device,
                 timeout_s: float, handlers: Mapping[MessageKind, SenderFrameHandler] | None = None,
                 host: str | None = None):
        """`handlers`: the backend's own reply-frame kinds (answers to `expect_reply` need none)."""
        self.address = address
        self._host = host  # None: the address that routes to the receiver
        self._hello, self._data_backend, self._timeout_s = hello, data_backend, timeout_s
        self._device = device
        self._handlers = dict(handlers or {})
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._replies: dict[tuple[MessageKind, int], Future] = {}
        self._error: TransferError | None = None
        self._is_closing = False
        self._pair: ProcessGroupPair | None = None
        self.connected: Future = Future()
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{address.peer_id}", daemon=True)
        self._reply_thread = threading.Thread(target=self._read_replies, name=f"kv-replies-{address.peer_id}",
                                              daemon=True)
        self._thread.start()

    @property
    def is_broken(self) -> bool:
        return self._error is not None

    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` on the channel thread after everything submitted before it."""
        self._queue.put(work)

    def expect_reply(self, kind: MessageKind, transfer_id: int) -> Future:
        """A future for the receiver's `kind` answer about `transfer_id` (register before sending)."""
        future: Future = Future()
        with self._lock:
            if self._error is not None:
                future.set_exception(self._error)
            else:
                self._replies[(kind, transfer_id)] = future
        return future

    def send_frame(self, frame: Frame) -> None:
        """Send a frame (channel thread only)."""
        self._pair.send_frame(frame, TAG_FORWARD)

    def send_pieces(self, table: torch.Tensor, payload: torch.Tensor) -> None:
        """Send layer pieces: a LAYERS frame, their table, their blocks in one payload (channel thread only)."""
        self._pair.send_frame(Frame(MessageKind.LAYERS, 0, num_blocks=table.shape[0]), TAG_FORWARD)
        self._pair.send_table(table)
        self._pair.send_payload(payload)

    def close(self, timeout_s: float) -> None:
        """Say CLOSE after the queued work, then stop (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        self._is_closing = True
        self._queue.put(self._CLOSE)
        self._thread.join(timeout_s)
        if self._reply_thread.is_alive():  # it ends on the receiver's GOODBYE, or a broken socket
            self._reply_thread.join(max(0.0, deadline - time.monotonic()))
        if not (self._thread.is_alive() or self._reply_thread.is_alive()):
            self._pair = None  # destroy the groups now, not in interpreter teardown

    def _run(self) -> None:
        try:
            store, number = connect(self.address, self._hello, self._timeout_s)
            host = self._host or address_toward(self.address.host)
            self._pair = open_pair(store, SENDER, self._data_backend, self._timeout_s, host)
            self._reply_thread.start()
            self.connected.set_result(number)
            with own_stream(self._device):
                while (work := self._queue.get()) is not self._CLOSE:
                    if self._error is None:
                        work()
            self._pair.send_frame(Frame(MessageKind.CLOSE, 0), TAG_FORWARD)
        except Exception as e:
            self._break(e)
            if not self.connected.done():
                self.connected.set_exception(self._error)

    def _read_replies(self) -> None:
        try:
            while (frame := self._pair.recv_frame(TAG_REPLY)).kind != MessageKind.GOODBYE:
                if frame.kind in self._handlers:
                    self._handlers[frame.kind](frame)
                    continue
                with self._lock:
                    future = self._replies.pop((frame.kind, frame.transfer_id), None)
                if future is not None:
                    future.set_result(AckStatus(frame.status))
            self._break(TransferError(f"receiver {self.address.peer_id} closed the channel"))
            self._queue.put(self._CLOSE)
        except Exception as e:
            self._break(e)

    def _break(self, cause: Exception) -> None:
        """Fail everything waiting on this channel; later work is skipped."""
        error = cause if isinstance(cause, TransferError) else TransferError(
            f"channel to receiver {self.address.peer_id} broke: {cause}")
        with self._lock:
            if self._error is None:
                self._error = error
                log.log(logging.DEBUG if self._is_closing else logging.WARNING, "%s", error)
            pending, self._replies = list(self._replies.values()), {}
        for future in pending:
            future.set_exception(self._error)
