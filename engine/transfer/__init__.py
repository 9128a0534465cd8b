"""Moving KV blocks between the block pools of two processes.

One interface, several backends picked by where the two ends live: `nccl`
(different GPUs), `cuda_ipc` (one GPU: the receiver's pool mapped once),
`gloo` (CPU), and `fake` (in-process, with fault injection, for tests).

    receiver = make_receiver("gloo", kv_cache, host=node_ip)      # decode replica, listening on node_ip
    receiver.expect(tid, block_ids); dest = receiver.destination(tid, block_ids)
    sender = make_sender("gloo", kv_cache)                         # prefill replica
    sender.send_layer(dest, layer, src_block_ids, first_block_index)   # per layer, returns at once
    sender.finish(dest, num_blocks_total, timeout_s)               # raises TransferError
    # TP replicas: each rank has its own sender/receiver with its `KvShard`; a TP decode
    # replica's destination is KvDestination.of_ranks(each rank's); every prefill rank
    # sends each decode rank the heads it is the source of (heads.py).
    outcome = receiver.wait(tid, timeout_s)                        # a value: outcome.is_ok / .reason
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.kv_cache import KvCache
from pdserve.engine.transfer.base import KvReceiver, KvSender
from pdserve.engine.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from pdserve.engine.transfer.fake import FakeReceiver, FakeSender, FaultInjection
from pdserve.engine.transfer.heads import KvShard
from pdserve.engine.transfer.messages import (
    WIRE_VERSION,
    ChannelAddress,
    FailureReason,
    HandshakeError,
    KvDestination,
    TransferError,
    TransferOutcome,
)
from pdserve.engine.transfer.torch_dist import (
    NcclReceiver,
    NcclSender,
    TorchDistReceiver,
    TorchDistSender,
    device_uuid,
)

BACKENDS = ("gloo", "nccl", "cuda_ipc", "fake")

__all__ = [
    "BACKENDS", "WIRE_VERSION", "ChannelAddress", "DeviceLocation", "FailureReason", "FaultInjection",
    "HandshakeError", "KvDestination", "KvShard", "KvReceiver", "KvSender", "TransferError", "TransferOutcome",
    "choose_backend", "make_receiver", "make_sender",
]


@dataclass(frozen=True)
class DeviceLocation:
    """Where a replica's KV pool lives: its host and its GPU's UUID ('' on the CPU)."""

    hostname: str
    device_uuid: str

    @classmethod
    def of(cls, device: torch.device) -> DeviceLocation:
        return cls(socket.gethostname(), device_uuid(torch.device(device)))


def choose_backend(sender: DeviceLocation, receiver: DeviceLocation) -> str:
    """The backend for a pair: cuda_ipc on one GPU, nccl between GPUs, gloo when either is on the CPU."""
    if not sender.device_uuid or not receiver.device_uuid:
        return "gloo"
    if sender == receiver:
        return "cuda_ipc"
    return "nccl"


def make_receiver(backend: str, kv_cache: KvCache, host: str = "127.0.0.1", port: int = 0,
                  peer_id: str | None = None, timeout_s: float = 30.0, shard: KvShard | None = None,
                  **options: Any) -> KvReceiver:
    """A receiver for `backend`, listening on `host:port` (0: any free port); fake ignores both.
    `shard`: the kv heads the pool holds when it is one TP rank's (None: all)."""
    if backend == "fake":
        return FakeReceiver(kv_cache, peer_id=peer_id, shard=shard)
    kwargs = dict(host=host, port=port, peer_id=peer_id, timeout_s=timeout_s, shard=shard, **options)
    if backend == "gloo":
        return TorchDistReceiver(kv_cache, **kwargs)
    if backend == "nccl":
        return NcclReceiver(kv_cache, **kwargs)
    if backend == "cuda_ipc":
        return CudaIpcReceiver(kv_cache, **kwargs)
    raise ValueError(f"unknown transfer backend {backend!r}; choose from {BACKENDS}")


def make_sender(backend: str, kv_cache: KvCache, sender_id: str | None = None, timeout_s: float = 30.0,
                faults: FaultInjection | None = None, host: str | None = None,
                shard: KvShard | None = None) -> KvSender:
    """A sender for `backend`, binding local address `host` (None: whichever routes to each receiver);
    `faults` only for `fake`; `shard` as for `make_receiver`."""
    if faults is not None and backend != "fake":
        raise ValueError("fault injection is only for the fake backend")
    if backend == "fake":
        return FakeSender(kv_cache, faults or FaultInjection(), shard=shard)
    kwargs = dict(sender_id=sender_id, timeout_s=timeout_s, host=host, shard=shard)
    if backend == "gloo":
        return TorchDistSender(kv_cache, **kwargs)
    if backend == "nccl":
        return NcclSender(kv_cache, **kwargs)
    if backend == "cuda_ipc":
        return CudaIpcSender(kv_cache, **kwargs)
    raise ValueError(f"unknown transfer backend {backend!r}; choose from {BACKENDS}")
