"""What the router and the decode worker say to each other over Ray calls."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.transfer.messages import KvDestination


@dataclass(frozen=True)
class Reservation:
    """Blocks held for one request; the prefill replica fills them, the router streams from `stream_address`."""

    transfer_id: int
    destination: KvDestination | None  # None where the replica prefills itself (colocated)
    stream_address: str  # host:port of this replica's DecodeStream gRPC server
    replica_id: str


@dataclass(frozen=True)
class DecodeLoad:
    """What a decode replica reports to routing, metrics and the autoscaler."""

    replica_id: str
    num_running: int
    num_context_tokens: int  # KV tokens the running sequences read per step
    num_waiting: int  # reserved or admitted-but-not-running requests
    num_blocks_free: int
    num_blocks_total: int
    step_time_s: float  # mean recent decode step period (wall time, what TPOT sees)
    batch_size: float  # mean recent batch size of those steps
    gpu_step_time_s: float  # mean device time of one of those steps (engine/step_timing.py)
    gpu_idle_share: float  # 1 - device busy / wall over the recent steps
    launch_time_s: float  # mean host time launching a step (CUDA; near gpu_step_time_s: launch-bound)
    max_running: int  # the batch limit this replica runs with
    tokens_per_s: float
    host_s_per_seq: float  # the decode loop's own host time per running sequence per step (not waiting for the GPU)
    is_draining: bool
    overlap_steps: bool  # the loop queues step N+1 before reading step N's tokens


class QueueFull(RuntimeError):
    """This replica's waiting queue is full: refuse the request at once."""


class KvPoolFull(RuntimeError):
    """Not enough free KV blocks now: the request may wait for some within its deadline."""


class ReplicaDraining(RuntimeError):
    """This replica is leaving and takes no new requests."""
