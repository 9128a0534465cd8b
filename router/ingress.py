"""The router replica's own listeners: HTTP (the OpenAI app) and gRPC (`pdserve.v1.Generation`).

Every router replica binds the same HTTP and gRPC ports with SO_REUSEPORT, so the
kernel spreads client connections over the replicas of a node and each token goes
from the replica that made it straight to its client: no proxy relays it (Ray
Serve's proxies stay off). The listeners run on their own thread and event loop
(uvloop where installed), so they serve the same with or without Ray.

SO_REUSEPORT would as gladly share a port with any process of the same user, say a
second `pdserve serve` left running, and split the clients between two servers.
So a router first asks whoever listens on its HTTP port which application it
serves (`GET /v1/pdserve/app`), and joins the port only as a router of its own.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import uvicorn

from pdserve.protos.pdserve.v1 import generate_pb2_grpc

from .errors import grpc_details, grpc_status
from .generation import GenerationError
from .grpc_api import GrpcFrontEnd

log = logging.getLogger(__name__)


# A gRPC client keeps one connection per channel, and the kernel spreads connections, not calls, over
# the router replicas of a node: connections older than this are asked to go (GOAWAY) so that clients
# reconnect and rebalance; their calls in flight may finish within the request timeout.
GRPC_MAX_CONNECTION_AGE_S = 60


@dataclass(frozen=True)
class IngressSettings:
    host: str
    http_port: int
    grpc_port: int
    request_timeout_s: float  # the longest a call may run: a closing gRPC connection's grace
    app_id: str  # the application's (routers of one application share their ports, no one else)


APP_PATH = "/v1/pdserve/app"


class PortTaken(OSError):
    """Another process, not a router of this application, listens on a router port."""


def check_ports_are_ours(settings: IngressSettings) -> None:
    """Raise `PortTaken` unless each port is free or served by a router of `settings.app_id`."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else "::1" if settings.host == "::" else settings.host
    http_taken, grpc_taken = (_listening(host, port) for port in (settings.http_port, settings.grpc_port))
    if not http_taken and not grpc_taken:
        return
    served = _served_app(host, settings.http_port) if http_taken else None
    if served != settings.app_id:  # a foreign HTTP server, or a gRPC port taken beside a free HTTP one
        port = settings.http_port if http_taken else settings.grpc_port
        raise PortTaken(f"Address already in use: port {port} on {settings.host} is served by another process, not "
                        "a router of this application (another pdserve serve?); stop it or choose other ports")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _served_app(host: str, port: int) -> str | None:
    """The application id a pdserve router on `port` answers with; None for anything else."""
    try:
        reply = httpx.get(f"http://{host if ':' not in host else f'[{host}]'}:{port}{APP_PATH}", timeout=3.0)
        return reply.json().get("app") if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    """The public gRPC service on a grpc.aio server: a failure ends the call with its status."""

    def __init__(self, front: GrpcFrontEnd):
        self.front = front

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext):
        try:
            async for message in self.front.Generate(request, context):
                yield message
        except GenerationError as error:
            await context.abort(grpc_status(error), grpc_details(error))

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.front.Health(request, context)


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other router replicas on this node may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Ingress:
    """HTTP and gRPC listeners on one thread; `start` returns once both accept connections."""

    def __init__(self, settings: IngressSettings):
        self.settings = settings
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-ingress", daemon=True)
        self._thread.start()

    def _run(self, work: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the ingress loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=timeout_s)

    def start(self, http_app: Any, grpc_front: GrpcFrontEnd) -> None:
        check_ports_are_ours(self.settings)
        self._run(self._start(http_app, grpc_front))

    async def _start(self, http_app: Any, grpc_front: GrpcFrontEnd) -> None:
        s = self.settings
        # gRPC first: a replica that cannot bind must fail before its HTTP port has answered /health
        self._grpc = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1), ("grpc.max_connection_age_ms", 1000 * GRPC_MAX_CONNECTION_AGE_S),
            ("grpc.max_connection_age_grace_ms", int(1000 * s.request_timeout_s))])
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(grpc_front), self._grpc)
        try:
            bound = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError:  # grpc raises where it cannot bind
            bound = 0
        if bound == 0:
            raise PortTaken(f"Address already in use: cannot bind the gRPC port {s.host}:{s.grpc_port}")
        await self._grpc.start()
        config = uvicorn.Config(http_app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30, backlog=2048)
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[_shared_socket(s.host, s.http_port)]))
        for _ in range(500):  # uvicorn sets `started` once its socket serves
            if self._http.started or self._http_task.done():
                break
            await asyncio.sleep(0.01)
        if self._http_task.done():
            self._http_task.result()  # raises what stopped it
        log.info("router ingress: HTTP %s:%d, gRPC %s:%d", s.host, s.http_port, s.host, s.grpc_port)

    def stop(self, grace_s: float = 2.0) -> None:
        async def shutdown() -> None:  # of what `_start` got to start
            if hasattr(self, "_http"):
                self._http.should_exit = True
            if hasattr(self, "_grpc"):
                await self._grpc.stop(grace_s)
            if hasattr(self, "_http_task"):
                await asyncio.wait_for(self._http_task, timeout=grace_s + 3)

        try:
            self._run(shutdown(), timeout_s=grace_s + 10)
        except Exception as e:  # the replica is going away either way; say why it was not clean
            log.warning("router ingress did not stop cleanly: %r", e)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
