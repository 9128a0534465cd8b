"""The receiver's book of expected transfers: which blocks landed, and how each ended.

A transfer's life on the receiver:
    expect()  -> RECEIVING: LAYERS/LANDED frames mark (layer, block) cells of some heads landed
    FINISH    -> the sender's heads: failed unless every layer covers the first `num_blocks_total`
                 blocks of them; OK once FINISHes covered every head of this pool
                 (one sender at TP 1; several prefill ranks may each send some heads)
    failure   -> failed outcome with a reason (peer gone, channel error, timeout)
    wait(), a poll() that finds it ended, or cancel() -> forgotten; later data for it is dropped.
Writes into the pool happen under the book's lock, so once `cancel` or `wait`
returns, no write for that transfer is in progress or will start.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Hashable, NamedTuple, Sequence

import torch

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.messages import AckStatus, FailureReason, TransferOutcome

log = logging.getLogger(__name__)


ALL_HEADS = slice(None)


class LayerPiece(NamedTuple):
    """Blocks of one layer of one transfer: `data` [2, n, ..., heads, head_dim] goes to block indices
    [first, first + n), at `heads` of this pool's head axis."""

    transfer_id: int
    layer: int
    first_block_index: int
    data: torch.Tensor
    heads: slice = ALL_HEADS


@dataclass
class _Expected:
    block_ids: tuple[int, ...]
    num_layers: int
    num_heads: int
    # per head range a sender writes: [layer][block index] = 1 once written
    landed: dict[tuple[int, int], list[bytearray]] = field(default_factory=dict)
    finished_heads: bytearray = field(default_factory=bytearray)  # [head] = 1 once its sender finished
    done: threading.Event = field(default_factory=threading.Event)
    outcome: TransferOutcome | None = None
    writer: Hashable | None = None  # cuda_ipc: the channel admitted to write directly

    def cells(self, heads: tuple[int, int]) -> list[bytearray]:
        if heads not in self.landed:
            self.landed[heads] = [bytearray(len(self.block_ids)) for _ in range(self.num_layers)]
        return self.landed[heads]

    def missing(self, num_blocks_total: int, heads: tuple[int, int]) -> str:
        """A description of the first layer with a block of `heads` not landed, or ''."""
        for layer, row in enumerate(self.cells(heads)):
            if not all(row[:num_blocks_total]):
                missing = [i for i in range(num_blocks_total) if not row[i]]
                return f"layer {layer} heads {heads} missing block indices {missing}"
        return ""


class TransferLedger:
    """Expected transfers of one receiver, written into its `KvCache`."""

    def __init__(self, kv_cache: KvCache):
        self._kv = kv_cache
        self._lock = threading.Lock()
        self._expected: dict[int, _Expected] = {}

    def expect(self, transfer_id: int, block_ids: tuple[int, ...], num_layers: int) -> None:
        """Start accepting data for `transfer_id` into `block_ids`."""
        num_blocks = self._kv.spec.num_blocks
        if any(not 0 <= b < num_blocks for b in block_ids):
            raise ValueError(f"transfer {transfer_id}: block ids outside the pool of {num_blocks}")
        with self._lock:
            if transfer_id in self._expected:
                raise ValueError(f"transfer {transfer_id} is already expected")
            heads = self._kv.spec.num_kv_heads
            self._expected[transfer_id] = _Expected(tuple(block_ids), num_layers, heads,
                                                    finished_heads=bytearray(heads))

    def write(self, pieces: Sequence[LayerPiece]) -> None:
        """Import each piece into its transfer's blocks (one device sync for all); drop those no longer wanted."""
        with self._lock:
            landed = []
            for piece in pieces:
                n = piece.data.shape[1]
                entry = self._receiving(piece.transfer_id, piece.layer, piece.first_block_index, n)
                if entry is None:
                    continue
                ids = entry.block_ids[piece.first_block_index : piece.first_block_index + n]
                self._kv.import_blocks(piece.layer, torch.tensor(ids, dtype=torch.int64), piece.data, piece.heads)
                landed.append((entry, piece.layer, piece.first_block_index, n, self._range(piece.heads)))
            if landed and self._kv.tensor.is_cuda:
                torch.cuda.current_stream(self._kv.tensor.device).synchronize()  # landed means landed
            for entry, layer, first, n, heads in landed:
                entry.cells(heads)[layer][first : first + n] = b"\x01" * n

    def mark_landed(self, transfer_id: int, layer: int, first_block_index: int, num_blocks: int) -> None:
        """Record blocks a peer wrote directly (cuda_ipc)."""
        with self._lock:
            entry = self._receiving(transfer_id, layer, first_block_index, num_blocks)
            if entry is not None:
                cells = entry.cells(self._range(ALL_HEADS))
                cells[layer][first_block_index : first_block_index + num_blocks] = b"\x01" * num_blocks

    def admit(self, transfer_id: int, writer: Hashable) -> AckStatus:
        """Let `writer` write this transfer's blocks directly (cuda_ipc); fenced on cancel."""
        with self._lock:
            entry = self._expected.get(transfer_id)
            if entry is None or entry.outcome is not None:
                return AckStatus.UNKNOWN_TRANSFER
            entry.writer = writer
            return AckStatus.ACCEPTED

    def finish(self, transfer_id: int, num_blocks_total: int, heads: slice = ALL_HEADS) -> AckStatus:
        """A sender says it sent `num_blocks_total` blocks per layer of `heads`: fail if some did not
        land; complete once every head of the pool was finished."""
        with self._lock:
            entry = self._expected.get(transfer_id)
            if entry is None:
                return AckStatus.UNKNOWN_TRANSFER
            if entry.outcome is not None:
                return AckStatus.OK if entry.outcome.is_ok else AckStatus.FAILED
            span = self._range(heads)
            missing = "more blocks than reserved" if num_blocks_total > len(entry.block_ids) else ""
            missing = missing or entry.missing(num_blocks_total, span)
            if not missing and any(entry.finished_heads[span[0]:span[1]]):
                missing = f"heads {span} finished twice"
            if missing:
                self._settle(entry, TransferOutcome.failed(transfer_id, FailureReason.CHANNEL_ERROR, missing))
                return AckStatus.INCOMPLETE
            entry.finished_heads[span[0]:span[1]] = b"\x01" * (span[1] - span[0])
            if all(entry.finished_heads):
                self._settle(entry, TransferOutcome(transfer_id))
            return AckStatus.OK

    def fail(self, transfer_ids: list[int], reason: FailureReason, detail: str) -> None:
        """Fail every still-open transfer among `transfer_ids`."""
        with self._lock:
            for tid in transfer_ids:
                entry = self._expected.get(tid)
                if entry is not None and entry.outcome is None:
                    self._settle(entry, TransferOutcome.failed(tid, reason, detail))

    def wait(self, transfer_id: int, timeout_s: float) -> tuple[TransferOutcome, Hashable | None]:
        """Block until the transfer ends or `timeout_s` passes, then forget it.

        Returns the outcome and the writer admitted to it (cuda_ipc must fence a failed one).
        """
        with self._lock:
            entry = self._expected.get(transfer_id)
        if entry is None:
            return TransferOutcome.failed(transfer_id, FailureReason.UNKNOWN_TRANSFER, "not expected"), None
        entry.done.wait(max(0.0, timeout_s))
        with self._lock:
            self._expected.pop(transfer_id, None)
            if entry.outcome is None:
                detail = f"not complete after {timeout_s:.3g} s"
                self._settle(entry, TransferOutcome.failed(transfer_id, FailureReason.TIMEOUT, detail))
        return entry.outcome, entry.writer

    def poll(self, transfer_id: int) -> tuple[TransferOutcome | None, Hashable | None]:
        """The outcome if the transfer ended (then forgotten), None while it is still open; never blocks."""
        with self._lock:
            entry = self._expected.get(transfer_id)
            if entry is None:
                return TransferOutcome.failed(transfer_id, FailureReason.UNKNOWN_TRANSFER, "not expected"), None
            if entry.outcome is None:
                return None, None
            del self._expected[transfer_id]
            return entry.outcome, entry.writer

    def cancel(self, transfer_id: int) -> Hashable | None:
        """Forget the transfer; return the writer admitted to it (cuda_ipc must fence it), if any."""
        with self._lock:
            entry = self._expected.pop(transfer_id, None)
            if entry is None:
                return None
            if entry.outcome is None:
                self._settle(entry, TransferOutcome.failed(transfer_id, FailureReason.CANCELLED, "cancelled"))
            return entry.writer

    def _receiving(self, transfer_id: int, layer: int, first: int, n: int) -> _Expected | None:
        """The open entry data may go to, or None: not expected, or failed now on a bad range (caller holds the lock)."""
        entry = self._expected.get(transfer_id)
        if entry is None or entry.outcome is not None:
            log.debug("transfer %d: dropping data for layer %d (not expected)", transfer_id, layer)
            return None
        if not (0 <= layer < entry.num_layers and 0 <= first and n > 0 and first + n <= len(entry.block_ids)):
            detail = f"bad range: layer {layer}, blocks [{first}, {first + n}) of {len(entry.block_ids)}"
            self._settle(entry, TransferOutcome.failed(transfer_id, FailureReason.CHANNEL_ERROR, detail))
            return None
        return entry

    def _range(self, heads: slice) -> tuple[int, int]:
        """(start, stop) of a slice of this pool's head axis."""
        start, stop, _ = heads.indices(self._kv.spec.num_kv_heads)
        return start, stop

    @staticmethod
    def _settle(entry: _Expected, outcome: TransferOutcome) -> None:
        if not outcome.is_ok:
            log.warning("transfer %d failed: %s (%s)", outcome.transfer_id, outcome.reason.value, outcome.detail)
        entry.outcome = outcome
        entry.done.set()
