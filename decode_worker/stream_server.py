"""The decode replica's gRPC server: one stream of token batches per subscribed router.

A router process opens `Subscribe` once per decode replica, then `Reserve`s KV
blocks for each request and `Open`s the reservation on its subscription (one
`Reserve` with `open` set does both, for a request that prefills here); every
engine step's tokens for that router's requests travel as one `TokenBatch` message. Batches produced while one is being sent are merged
into the next, so a slow router gets fewer, larger messages instead of a backlog.
A subscription that closes (router gone) aborts its requests, which frees their
blocks at once; `Release` does the same for one request (its client left).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
from typing import Callable

import grpc

from pdserve.engine.messages import PromptLogprob, Reservation, SamplingParams, StreamStart
from .rpc_server import RpcServer
from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc

from .errors import KvPoolFull, QueueFull, ReplicaBroken, ReplicaDraining
from .outbox import Outbox, TokenBatch
from .reserve_calls import ReserveCalls
from .worker import DecodeWorker

log = logging.getLogger(__name__)

ReserveFn = Callable[[str, int, int, float], Reservation]  # DecodeWorker.reserve's signature
_TRY_ELSEWHERE = (KvPoolFull, ReplicaDraining, ReplicaBroken)


def stream_start(request: pb.StreamRequest) -> StreamStart:
    params = SamplingParams(temperature=request.temperature, top_p=request.top_p or 1.0,
                            top_k=request.top_k, seed=request.seed, logprobs=request.logprobs,
                            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                            repetition_penalty=request.repetition_penalty or 1.0, min_tokens=request.min_tokens,
                            logit_bias=tuple(sorted(request.logit_bias.items())),
                            top_logprobs=request.top_logprobs, min_p=request.min_p,
                            prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None)
    return StreamStart(
        transfer_id=request.transfer_id, request_id=request.request_id,
        prompt=tuple(request.prompt_token_ids), generated=tuple(request.generated_token_ids),
        prefill_locally=request.prefill_locally, max_tokens=request.max_tokens, params=params,
        stop_ids=frozenset(request.stop_token_ids), deadline=request.deadline_unix_s,
        stream_interval=max(request.stream_interval, 1),
    )


def batch_message(batch: TokenBatch) -> pb.TokenBatch:
    """The proto of a batch: columns copied in bulk, endings one by one (one per finished request)."""
    message = pb.TokenBatch(transfer_ids=batch.transfer_ids, token_ids=batch.token_ids, logprobs=batch.logprobs)
    if batch.top_token_ids:  # else num_top stays empty: a message without alternatives carries none
        message.num_top.extend(batch.num_top)
        message.top_token_ids.extend(batch.top_token_ids)
        message.top_logprobs.extend(batch.top_logprobs)
    for transfer_id, scored in batch.prompt_logprobs:
        message.prompt_logprobs.append(prompt_logprobs_message(transfer_id, scored))
    for e in batch.endings:
        ending = message.endings.add(transfer_id=e.transfer_id, finish_reason=e.finish_reason or "",
                                     error=e.error or "", error_code=e.error_code.value if e.error_code else "")
        if e.timings:
            ending.timings.CopyFrom(pb.DecodeTimings(**e.timings))
    return message


def prompt_logprobs_message(transfer_id: int, scored: tuple[PromptLogprob, ...]) -> pb.PromptLogprobs:
    return pb.PromptLogprobs(
        transfer_id=transfer_id, token_ids=[p.token_id for p in scored], logprobs=[p.logprob for p in scored],
        ranks=[p.rank for p in scored], num_top=len(scored[0].top) if scored else 0,
        top_token_ids=[t for p in scored for t, _ in p.top], top_logprobs=[lp for p in scored for _, lp in p.top])


class DecodeStreamService(pb_grpc.DecodeStreamServicer):
    def __init__(self, worker: DecodeWorker, reserve: ReserveFn):
        self.worker = worker
        self.reserve = reserve
        self._subscribers: dict[str, Outbox] = {}
        self._calls = ReserveCalls()

    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext):
        loop = asyncio.get_running_loop()
        batches: asyncio.Queue[TokenBatch] = asyncio.Queue()
        outbox = Outbox(lambda batch: loop.call_soon_threadsafe(batches.put_nowait, batch), request.subscriber_id)
        self._subscribers[request.subscriber_id] = outbox
        try:
            yield pb.TokenBatch()  # registered: the router may Open now
            while True:
                merged = await batches.get()
                while not batches.empty():
                    merged.extend(batches.get_nowait())
                yield batch_message(merged)
        finally:
            self._subscribers.pop(request.subscriber_id, None)
            self.worker.abort_subscriber(outbox, "the router's stream closed")

    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveReply:
        outbox = await self._outbox(request.open.subscriber_id, context) if request.HasField("open") else None
        if self._calls.is_released(request.call_id):  # its router gave up on it and released it first
            await context.abort(grpc.StatusCode.CANCELLED, f"reserve call {request.call_id} was released")
        try:
            reservation = self.reserve(request.request_id, request.num_prompt_tokens, request.max_tokens,
                                       request.deadline_unix_s)
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except _TRY_ELSEWHERE as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        self._calls.served(request.call_id, reservation.transfer_id)
        if outbox is not None:
            start = dataclasses.replace(stream_start(request.open), transfer_id=reservation.transfer_id)
            self.worker.open(start, outbox)
        destination = b"" if reservation.destination is None else pickle.dumps(reservation.destination)
        return pb.ReserveReply(transfer_id=reservation.transfer_id, replica_id=reservation.replica_id,
                               destination=destination)

    async def Open(self, request: pb.StreamRequest, context: grpc.aio.ServicerContext) -> pb.OpenReply:
        self.worker.open(stream_start(request), await self._outbox(request.subscriber_id, context))
        return pb.OpenReply()

    async def _outbox(self, subscriber_id: str, context: grpc.aio.ServicerContext) -> Outbox:
        outbox = self._subscribers.get(subscriber_id)
        if outbox is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no subscription {subscriber_id!r} on this decode replica")
        return outbox

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        transfer_id = self._calls.release(request.call_id) if request.call_id else request.transfer_id
        if transfer_id is not None:
            self.worker.abort(transfer_id, request.reason or "released by the router")
        return pb.ReleaseReply()


class StreamServer:
    """The decode replica's `DecodeStream` server."""

    def __init__(self, worker: DecodeWorker, host: str = "127.0.0.1", port: int = 0, reserve: ReserveFn | None = None):
        """`reserve`: how `Reserve` holds blocks (default `worker.reserve`; the replica adds its own checks)."""
        service = DecodeStreamService(worker, reserve or worker.reserve)
        self._server = RpcServer(lambda server: pb_grpc.add_DecodeStreamServicer_to_server(service, server),
                                 host, port, "decode-stream")
        self.address = self._server.address

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s)
