"""The decode replica's gRPC server: one server stream of token chunks per request.

The router opens `DecodeStream.Stream` on the replica that holds the request's
reservation. Tokens produced while a message is being sent are coalesced into the
next one, so a slow client gets several tokens per message instead of a backlog.
A cancelled call aborts the request, which frees its blocks at once.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdserve.engine.sampler import SamplingParams
from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc

from .sequence import TokenEvent
from .worker import DecodeWorker, StreamStart

log = logging.getLogger(__name__)


def stream_start(request: pb.StreamRequest) -> StreamStart:
    params = SamplingParams(temperature=request.temperature, top_p=request.top_p or 1.0,
                            top_k=request.top_k, seed=request.seed, logprobs=request.logprobs)
    return StreamStart(
        transfer_id=request.transfer_id, request_id=request.request_id,
        prompt=tuple(request.prompt_token_ids), generated=tuple(request.generated_token_ids),
        prefill_locally=request.prefill_locally, max_tokens=request.max_tokens, params=params,
        stop_ids=frozenset(request.stop_token_ids), deadline=request.deadline_unix_s,
    )


class DecodeStreamService(pb_grpc.DecodeStreamServicer):
    def __init__(self, worker: DecodeWorker, executor: ThreadPoolExecutor):
        self.worker = worker
        self.executor = executor  # waits for KV landing block a thread each

    async def Stream(self, request: pb.StreamRequest, context: grpc.aio.ServicerContext):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        start = stream_start(request)

        def sink(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        opening = loop.run_in_executor(self.executor, self.worker.open, start, sink)
        finished = False
        try:
            while not finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                chunk, finished = _merge(batch)
                yield chunk
        finally:
            if not finished:
                self.worker.abort(request.transfer_id, "stream closed by the router")
            await asyncio.shield(opening)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        self.worker.abort(request.transfer_id, request.reason or "released by the router")
        return pb.ReleaseReply()


def _merge(events: list[TokenEvent]) -> tuple[pb.TokenChunk, bool]:
    chunk = pb.TokenChunk()
    for event in events:
        chunk.token_ids.extend(event.token_ids)
        chunk.logprobs.extend(event.logprobs)
        if event.finish_reason:
            chunk.finish_reason = event.finish_reason
        if event.error:
            chunk.error, chunk.error_code = event.error, event.error_code or "unavailable"
        if event.timings:
            chunk.timings.CopyFrom(pb.DecodeTimings(**event.timings))
    return chunk, bool(chunk.finish_reason or chunk.error)


class StreamServer:
    """A grpc.aio server on its own thread and event loop, so it serves with or without Ray."""

    def __init__(self, worker: DecodeWorker, host: str = "127.0.0.1", port: int = 0):
        self.worker = worker
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kv-wait")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._host, self._port = host, port
        self._thread = threading.Thread(target=self._run, name="decode-stream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the decode stream server did not start")
        self.address = f"{host}:{self._port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_DecodeStreamServicer_to_server(DecodeStreamService(self.worker, self._executor), self._server)
        self._port = self._server.add_insecure_port(f"{self._host}:{self._port}")
        await self._server.start()
        self._ready.set()

    def stop(self, grace_s: float = 1.0) -> None:
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
        future.result(timeout=grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
