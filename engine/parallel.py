"""Tensor parallelism: the ranks of one replica and their collectives.

A replica of TP size N runs N processes (one per GPU), each holding 1/N of every
large weight (see engine/sharding.py). They meet through an explicit rendezvous
that the caller passes in (cluster/ picks the host; engine/ knows no Ray):

    rendezvous, store = host_rendezvous(host)                 # on the leader, before any rank starts
    tp = TensorParallel.join(rendezvous, 0, size, device, store)  # the leader
    tp = TensorParallel.join(rendezvous, rank, size, device)      # every other rank
    tp.all_reduce(x)          # in place, after the row-parallel projections (o, down)
    cmd = tp.broadcast(cmd)   # the leader's step inputs reach every rank (rank 0 sends)
    tp.broadcast_(tokens)     # the leader's sampled tokens, on the device, on every rank

Size 1 is `TensorParallel.single()`: every collective is a no-op. Every collective
waits at most `timeout_s`: a dead rank ends its peers' steps with
`CollectiveTimeout`, never a hang. Payload collectives run on the device's
group (NCCL on GPUs, gloo on the CPU); step inputs always travel over gloo.
"""
from __future__ import annotations

import ctypes
import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

from pdserve.engine.stores import listening_store
from pdserve.engine.transfer.nccl_env import keep_process_on_nccl_error


_IDLE_FOREVER = datetime.timedelta(days=365)


class CollectiveTimeout(RuntimeError):
    """A collective of the TP group failed or did not complete in time (a rank died or hangs)."""


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one TP group meet: rank 0 hosts a TCPStore on `host:port`."""

    host: str
    port: int
    timeout_s: float = 30.0  # each collective's bound
    key: str = "tp"  # a prefix, so one store can host several groups
    join_timeout_s: float | None = None  # how long ranks may take to meet (None: timeout_s)

    @property
    def join_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.join_timeout_s or self.timeout_s)


def host_rendezvous(host: str, timeout_s: float = 30.0, join_timeout_s: float | None = None,
                    key: str = "tp") -> tuple[Rendezvous, Store]:
    """A store on `host` at a port the OS picks, and the rendezvous that names it. Whoever calls
    this keeps the store alive (pass it to `join`); the ranks connect to it."""
    store = listening_store(host, 0, join_timeout_s or timeout_s)
    return Rendezvous(host, store.port, timeout_s, key, join_timeout_s), store


class TensorParallel:
    """One rank's view of its TP group."""

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None,
                 control: dist.ProcessGroup | None = None, timeout_s: float = 30.0):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a TP group of {size}")
        if size > 1 and (group is None or control is None):
            raise ValueError("a TP group of more than one rank needs its process groups")
        self.rank, self.size = rank, size
        self.group, self.control = group, control
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store: Store | None = None  # rank 0 keeps the TCPStore alive

    @classmethod
    def single(cls) -> TensorParallel:
        return cls(0, 1)

    @classmethod
    def join(cls, rendezvous: Rendezvous, rank: int, size: int, device: torch.device | str = "cpu",
             store: Store | None = None) -> TensorParallel:
        """Build this rank's groups; blocks until every rank joined (at most the join timeout).
        `store`: the one `host_rendezvous` made, where this process hosts it; else a client of it."""
        if size == 1:
            return cls.single()
        timeout = rendezvous.join_timeout
        if store is None:
            store = TCPStore(rendezvous.host, rendezvous.port, is_master=False, timeout=timeout,
                             wait_for_workers=False)
        prefixed = PrefixStore(f"{rendezvous.key}/", store)
        control = dist.ProcessGroupGloo(PrefixStore("control/", prefixed), rank, size, timeout)
        device = torch.device(device)
        if device.type == "cuda":
            keep_process_on_nccl_error()  # a dead peer aborts this group's communicator; the replica ends cleanly
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(PrefixStore("nccl/", prefixed), rank, size, options)
        else:
            group = control
        tp = cls(rank, size, group, control, rendezvous.timeout_s)
        tp._store = store
        return tp

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def can_capture_graphs(self) -> bool:
        """CUDA graphs may hold this group's collectives: true alone or on NCCL."""
        return self.size == 1 or self._is_nccl

    @property
    def _is_nccl(self) -> bool:
        return dist.is_nccl_available() and isinstance(self.group, dist.ProcessGroupNCCL)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        if self.size == 1:
            return x
        work = self.group.allreduce([x])
        self._wait(work, "all_reduce", device_side=self._is_nccl)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order (same shapes on every rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        work = self.group.allgather([parts], [x.contiguous()])
        self._wait(work, "all_gather", device_side=self._is_nccl)
        return torch.cat(parts, dim=dim)

    def broadcast_(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere), in place."""
        if self.size == 1:
            return x
        self._wait(self.group.broadcast(x, 0), "broadcast", device_side=self._is_nccl)
        return x

    def broadcast(self, obj: Any = None, idle: bool = False) -> Any:
        """The leader's `obj` on every rank (picklable; the others pass None).

        `idle`: a follower waiting for the next step waits without a deadline (a replica may
        be idle for hours; a gloo wait that times out poisons the group). It still ends when
        the leader's process is gone: the socket breaks."""
        if self.size == 1:
            return obj
        if self.is_leader:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        forever = idle and not self.is_leader
        # gloo applies the group's timeout inside the collective too: an idle wait names its own
        work = self.control.broadcast(length, 0, _IDLE_FOREVER) if forever else self.control.broadcast(length, 0)
        self._wait(work, "broadcast", forever=forever)
        if not self.is_leader:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._wait(self.control.broadcast(payload, 0), "broadcast")
        # ctypes, not numpy: the engine does not depend on numpy
        return obj if self.is_leader else pickle.loads(ctypes.string_at(payload.data_ptr(), payload.numel()))

    def barrier(self) -> None:
        if self.size > 1:
            self._wait(self.control.barrier(), "barrier")

    def close(self) -> None:
        """Let go of the groups (and, on rank 0, the store)."""
        self.group = self.control = None
        self._store = None

    def _wait(self, work: dist.Work, what: str, device_side: bool = False, forever: bool = False) -> None:
        try:
            if forever:
                work.wait(_IDLE_FOREVER)
            elif device_side:
                # NCCL: the stream waits for the collective; the group's own timeout aborts it
                # (a host-side deadline here would break CUDA graph capture).
                work.wait()
            elif not work.wait(self.timeout):
                raise CollectiveTimeout(f"TP rank {self.rank}/{self.size}: {what} not done after {self.timeout}")
        except CollectiveTimeout:
            raise
        except Exception as e:  # gloo raises RuntimeError on a peer gone or a timeout
            raise CollectiveTimeout(f"TP rank {self.rank}/{self.size}: {what} failed: {e}") from e
