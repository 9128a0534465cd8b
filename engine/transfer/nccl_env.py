"""NCCL's settings in a pdserve process: NCCL and torch's NCCL watchdog read only the environment.

pdserve writes two of them, just before it builds an NCCL group, and only where the
user's environment set nothing (`NCCL_*` of `pdserve serve` reach Ray's workers):
- `TORCH_NCCL_ASYNC_ERROR_HANDLING=2`: on a stuck or dead peer torch aborts that group's
  communicator and the waits on it raise. torch's default (3) ends the whole process, and
  with it every other request of the replica. Not a config key: the failover of
  DESIGN.md section 3 (step 6) stands on it, and no other value keeps it.
- `NCCL_SOCKET_IFNAME`: the interface of the address a KV channel binds (`transfer.interface`,
  or the node's address), so NCCL's bootstrap and socket transport take the same network.
"""
from __future__ import annotations

import os

from pdserve.engine.transfer.addresses import interface_of, is_loopback

ASYNC_ERROR_HANDLING = "2"  # abort the communicator, keep the process


def keep_process_on_nccl_error() -> None:
    """A failed NCCL group raises in its waiters instead of ending the process."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", ASYNC_ERROR_HANDLING)


def point_nccl_at(host: str) -> None:
    """NCCL's bootstrap and socket transport on `host`'s interface; loopback is left to NCCL's own choice."""
    interface = None if is_loopback(host) else interface_of(host)
    if interface is not None:
        os.environ.setdefault("NCCL_SOCKET_IFNAME", f"={interface}")
