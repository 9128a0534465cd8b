"""A grpc.aio server on its own thread and event loop, so a worker's server runs the same with or
without Ray (the decode replica's token streams, the prefill replica's calls)."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

import grpc


class RpcServer:
    """Serves what `add_services` adds on `host:port` (0: a free one; `address` tells)."""

    def __init__(self, add_services: Callable[[grpc.aio.Server], None], host: str, port: int = 0,
                 name: str = "rpc-server"):
        self._add_services = add_services
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._host, self._port = host, port
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"the {name} server did not start")
        self.address = f"{host}:{self._port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._add_services(self._server)
        self._port = self._server.add_insecure_port(f"{self._host}:{self._port}")
        await self._server.start()
        self._ready.set()

    def stop(self, grace_s: float = 1.0) -> None:
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
        future.result(timeout=grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
