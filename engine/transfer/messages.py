"""The transfer plane's messages: where KV goes, how a transfer ended, and the wire frame.

All of them are frozen dataclasses that pickle, so they cross Ray calls unchanged.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.heads import KvShard

# Bump on any change to the frame layout, the message kinds or the handshake.
WIRE_VERSION = 5  # 4: kv head shards (TP) in the hello and the address; 5: FP8 KV scales in the geometry


@dataclass(frozen=True)
class ChannelAddress:
    """How a sender reaches one receiver, and which kv heads its pool holds (`shard`);
    `ipc_handle` is the receiver's KV tensor (cuda_ipc only)."""

    backend: str
    host: str
    port: int
    peer_id: str
    shard: KvShard
    wire_version: int = WIRE_VERSION
    ipc_handle: Any = None


@dataclass(frozen=True)
class KvDestination:
    """A decode replica's reserved blocks for one transfer, and the channels to reach them:
    one per TP rank of the replica, in rank order (every rank holds the same block ids)."""

    transfer_id: int
    block_ids: tuple[int, ...]
    channels: tuple[ChannelAddress, ...]

    @property
    def key(self) -> tuple[str, int]:
        """(receiver, transfer id): transfer ids are per replica, so a sender keys its transfers by both."""
        return self.channels[0].peer_id, self.transfer_id

    @classmethod
    def of_ranks(cls, parts: list[KvDestination]) -> KvDestination:
        """One destination for a TP replica, from each rank's receiver's (in rank order)."""
        if len({(p.transfer_id, p.block_ids) for p in parts}) != 1:
            raise ValueError("the ranks of one replica must expect the same transfer into the same blocks")
        return cls(parts[0].transfer_id, parts[0].block_ids, tuple(c for p in parts for c in p.channels))


class FailureReason(enum.Enum):
    TIMEOUT = "timeout"
    PEER_GONE = "peer_gone"
    CHANNEL_ERROR = "channel_error"
    CANCELLED = "cancelled"
    UNKNOWN_TRANSFER = "unknown_transfer"


@dataclass(frozen=True)
class TransferOutcome:
    """How a transfer ended on the receiver: `is_ok`, or a failure reason with detail."""

    transfer_id: int
    reason: FailureReason | None = None
    detail: str = ""

    @property
    def is_ok(self) -> bool:
        return self.reason is None

    @classmethod
    def failed(cls, transfer_id: int, reason: FailureReason, detail: str) -> TransferOutcome:
        return cls(transfer_id, reason, detail)


class TransferError(RuntimeError):
    """A send that did not complete (raised by the sender; the receiver returns outcomes)."""


class HandshakeError(TransferError):
    """The two ends disagree on the wire version or the KV geometry."""


@dataclass(frozen=True)
class KvGeometry:
    """What both ends of a channel must agree on (the number of blocks and the TP shards may differ)."""

    num_layers: int
    block_size: int
    num_kv_heads: int  # the model's, over all TP ranks
    head_dim: int
    dtype: str
    # An FP8 pool's (K, V) scale per layer: its bytes mean x / scale, so both ends need the same
    # scales (the checkpoint's); () for other dtypes, whose bytes are the values themselves.
    scales: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:  # from JSON the pairs arrive as lists
        object.__setattr__(self, "scales", tuple(tuple(pair) for pair in self.scales))

    @classmethod
    def of(cls, kv_cache: KvCache, shard: KvShard) -> KvGeometry:
        spec = kv_cache.spec
        if len(shard.heads) != spec.num_kv_heads:
            raise ValueError(f"a pool of {spec.num_kv_heads} kv heads cannot hold shard {shard} ({shard.heads})")
        scales = tuple(tuple(pair) for pair in kv_cache.scales) if spec.is_fp8 else ()
        return cls(spec.num_layers, spec.block_size, shard.num_model_kv_heads, spec.head_dim, str(spec.dtype), scales)

    def mismatch(self, theirs: KvGeometry) -> str:
        """Why a peer with `theirs` cannot share blocks with us ('' when it can)."""
        if self.dtype != theirs.dtype:
            # Same shape, other bytes: most often one pool set kv_cache.dtype: fp8_e4m3 and the other did not.
            return (f"KV dtype {self.dtype} != peer's {theirs.dtype}: "
                    "prefill and decode pools need the same kv_cache.dtype (and model dtype)")
        if self.scales != theirs.scales:
            layer = next((i for i, (a, b) in enumerate(zip(self.scales, theirs.scales)) if a != b), 0)
            return (f"FP8 KV scales differ (layer {layer}: {self.scales[layer:layer + 1]} != peer's "
                    f"{theirs.scales[layer:layer + 1]}): both pools must load the same checkpoint's KV scales")
        if self != theirs:
            return f"KV geometry {self} != peer's {theirs}"
        return ""


class MessageKind(enum.IntEnum):
    """Frame kinds. Sender to receiver: LAYERS..FENCED; receiver to sender: FINISHED..CANCEL."""

    # `num_blocks` pieces follow: their table (int64 [n, 4]: transfer, layer, first block index,
    # blocks) on the control group, then one payload, the pieces' blocks concatenated on dim 1
    LAYERS = 1
    LANDED = 2  # cuda_ipc: these blocks of `layer` were copied into the receiver's pool
    LANDED_ALL_LAYERS = 7  # cuda_ipc: these blocks of every layer were copied (one frame, not one per layer)
    FINISH = 3  # num_blocks = blocks per layer in the whole transfer; answered by FINISHED
    CLOSE = 4  # the sender leaves the channel
    BEGIN = 5  # cuda_ipc: may I write this transfer's blocks? (answered by ADMITTED)
    FENCED = 6  # cuda_ipc: no write of this transfer will land any more
    FINISHED = 10  # answers FINISH; AckStatus in `status`
    ADMITTED = 11  # answers BEGIN; AckStatus in `status`
    GOODBYE = 12  # the receiver leaves the channel (or answers CLOSE)
    CANCEL = 13  # cuda_ipc: stop writing this transfer and answer FENCED


class AckStatus(enum.IntEnum):
    OK = 0
    ACCEPTED = 1
    UNKNOWN_TRANSFER = 2  # never expected, cancelled, or timed out on the receiver
    INCOMPLETE = 3  # FINISH came but some layer/block never landed
    FAILED = 4  # failed earlier on the receiver (bad block range, ...)


@dataclass(frozen=True)
class Frame:
    """The fixed-size header of every message on a channel, sent as an int64 tensor."""

    kind: MessageKind
    transfer_id: int
    layer: int = 0
    first_block_index: int = 0
    num_blocks: int = 0
    status: int = 0

    SIZE = 6

    def to_tensor(self) -> torch.Tensor:
        values = [int(self.kind), self.transfer_id, self.layer, self.first_block_index, self.num_blocks, self.status]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Frame:
        kind, tid, layer, first, num, status = t.tolist()
        return cls(MessageKind(kind), tid, layer, first, num, status)
