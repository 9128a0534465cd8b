"""The `TCPStore`s where processes meet (TP ranks, KV channels), each on one address."""
from __future__ import annotations

import datetime
import socket

from torch.distributed import TCPStore


class ListenError(RuntimeError):
    """A store could not listen on the address it was given."""


def listening_store(host: str, port: int, timeout_s: float) -> TCPStore:
    """A master store listening on `host:port` only (the store's own socket would listen on every
    interface). Port 0 takes one the OS picks, already bound when anyone learns it: no other
    process can take it in between, as it can between probing a free port and binding it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e}") from e
    # The store takes the socket over (and closes it when it stops).
    return TCPStore(host, sock.getsockname()[1], is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False, master_listen_fd=sock.detach())
