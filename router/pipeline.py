"""The serving pipeline behind the public APIs: reserve → prefill → stream.

For each `GenerationRequest`:
1. reserve KV blocks on a decode replica (Serve handle) — a full KV pool is
   retried until the deadline, a full queue is refused at once (429);
2. prefill on a prefill replica, which pushes the KV straight into those blocks
   and returns the first token — unless the request prefills on the decode
   replica itself (colocated pools, short prompts);
3. open the decode replica's gRPC token stream and relay it, detokenized and cut
   at stop strings.
A reservation whose stream never opens is released; a stream the client leaves
is cancelled, which frees the blocks on the decode replica at once.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc

from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc

from .generation import (
    DeadlineExceeded, GenerationChunk, GenerationError, GenerationRequest, HealthStatus, InvalidRequest,
    PhaseTimings, TryElsewhere, Unavailable, Usage,
)
from .metrics import RouterMetrics
from .relay import TextRelay

log = logging.getLogger(__name__)

_ERROR_CODES = {"deadline": DeadlineExceeded, "invalid": InvalidRequest}


@dataclass(frozen=True)
class PipelineSettings:
    colocated: bool = False
    short_prompt_tokens: int = 0  # prompts shorter than this prefill on the decode replica
    reserve_retry_s: float = 0.05


class Pipeline:
    """A `GenerationBackend` over a prefill pool and a decode pool (or one colocated pool)."""

    def __init__(self, prefill: Any, decode: Any, tokenizer: Any, eos_token_ids: tuple[int, ...],
                 settings: PipelineSettings, metrics: RouterMetrics | None = None):
        self.prefill = prefill  # Serve handle (None when colocated)
        self.decode = decode  # Serve handle of the decode (or colocated) pool
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.settings = settings
        self.metrics = metrics or RouterMetrics()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The request's chunks; counts its outcome and records its timeline in the metrics."""
        outcome = "cancelled"
        try:
            last_at = None
            async for chunk in self._generate(request):
                now = time.monotonic()
                if last_at is not None:
                    self.metrics.observe_inter_token(now - last_at)
                last_at = now
                if chunk.timings is not None:
                    self.metrics.observe_finished(chunk.timings)
                    outcome = "finished"
                yield chunk
        except GenerationError as e:
            outcome = type(e).__name__
            raise
        finally:
            self.metrics.count_outcome(outcome)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        received = time.monotonic()
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        relay = TextRelay(self.tokenizer, sampling.stop)
        reservation = await self._reserve(request)
        stub = pb_grpc.DecodeStreamStub(self._channel(reservation.stream_address))
        stream_opened = False
        try:
            generated, logprobs, timings = [], [], {}
            local = self.settings.colocated or len(request.prompt_token_ids) < self.settings.short_prompt_tokens
            if not local:
                result = await self._prefill(request, reservation, seed)
                generated, logprobs = [result.first_token], [result.first_logprob]
                timings = dict(queue_s=result.queue_s, prefill_s=result.prefill_s,
                               kv_transfer_s=result.transfer_wait_s, kv_bytes=result.kv_bytes,
                               prefill_replica=result.replica_id)
                first = relay.add(generated)
                yield GenerationChunk(tuple(generated), first.text, _maybe(logprobs, sampling.logprobs))
                if first.is_stopped:
                    yield self._last(request, generated, relay, "stop", received, timings, reservation)
                    return
            call = stub.Stream(self._stream_request(request, reservation, generated, logprobs, seed, local),
                               timeout=max(request.deadline - time.time(), 0.001))
            stream_opened = True
            first_token_at = None
            async for chunk in call:
                if chunk.error:
                    raise _error(chunk, reservation.replica_id)
                if chunk.token_ids:
                    first_token_at = first_token_at or time.monotonic()
                    generated.extend(chunk.token_ids)
                    out = relay.add(list(chunk.token_ids))
                    yield GenerationChunk(tuple(chunk.token_ids), out.text,
                                          tuple(chunk.logprobs) if sampling.logprobs else None)
                    if out.is_stopped:
                        call.cancel()
                        yield self._last(request, generated, relay, "stop", received, timings, reservation)
                        return
                if chunk.finish_reason:
                    if local:
                        timings.update(prefill_s=chunk.timings.prefill_s, prefill_replica=reservation.replica_id)
                    yield self._last(request, generated, relay, chunk.finish_reason, received, timings, reservation)
                    return
            raise Unavailable(f"decode replica {reservation.replica_id} ended the stream without finishing")
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(e, reservation.replica_id) from None
        finally:
            if not stream_opened:
                await self._release(stub, reservation.transfer_id)

    async def health(self) -> HealthStatus:
        pools = {"decode": self.decode} if self.settings.colocated else {"prefill": self.prefill, "decode": self.decode}
        counts = {}
        for name, handle in pools.items():
            try:
                counts[name] = await asyncio.wait_for(handle.ping.remote(), timeout=5)
            except Exception as e:  # any failure means: not ready
                return HealthStatus(False, 0, 0, f"{name} pool not ready: {e}")
        return HealthStatus(True, counts.get("prefill", 0), counts["decode"])

    async def _reserve(self, request: GenerationRequest) -> Any:
        """A reservation on some decode replica; waits (within the deadline) while KV pools are full."""
        while True:
            try:
                return await self.decode.reserve.remote(
                    request_id=request.request_id, num_prompt_tokens=len(request.prompt_token_ids),
                    max_tokens=request.sampling.max_tokens, deadline=request.deadline)
            except TryElsewhere as e:
                if time.time() + self.settings.reserve_retry_s > request.deadline:
                    raise DeadlineExceeded(f"no decode replica had room before the deadline: {e.message}") from None
                await asyncio.sleep(self.settings.reserve_retry_s)

    async def _prefill(self, request: GenerationRequest, reservation: Any, seed: int) -> Any:
        s = request.sampling
        return await self.prefill.prefill.remote(
            request_id=request.request_id, prompt=list(request.prompt_token_ids),
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, logprobs=s.logprobs,
            destination=reservation.destination, deadline=request.deadline)

    def _stream_request(self, request: GenerationRequest, reservation: Any, generated: list[int],
                        logprobs: list[float | None], seed: int, local: bool) -> pb.StreamRequest:
        s = request.sampling
        stop_ids = set(s.stop_token_ids) | (set() if s.ignore_eos else set(self.eos_token_ids))
        return pb.StreamRequest(
            request_id=request.request_id, transfer_id=reservation.transfer_id,
            prompt_token_ids=request.prompt_token_ids, generated_token_ids=generated,
            generated_logprobs=[lp or 0.0 for lp in logprobs], prefill_locally=local,
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed,
            stop_token_ids=sorted(stop_ids), logprobs=s.logprobs, deadline_unix_s=request.deadline,
        )

    def _last(self, request: GenerationRequest, generated: list[int], relay: TextRelay, reason: str,
              received: float, timings: dict, reservation: Any) -> GenerationChunk:
        """The closing chunk: held-back text, finish reason, usage and timings."""
        tail = relay.finish()
        e2e = time.monotonic() - received
        ttft = timings.get("queue_s", 0.0) + timings.get("prefill_s", 0.0) + timings.get("kv_transfer_s", 0.0)
        decode_s = max(e2e - ttft, 0.0)
        return GenerationChunk(
            (), tail.text, finish_reason="stop" if tail.is_stopped else reason,
            usage=Usage(len(request.prompt_token_ids), len(generated)),
            timings=PhaseTimings(ttft_s=ttft, e2e_s=e2e, decode_s=decode_s,
                                 tpot_s=decode_s / max(len(generated) - 1, 1),
                                 decode_replica=reservation.replica_id, **timings),
        )

    async def _release(self, stub: pb_grpc.DecodeStreamStub, transfer_id: int) -> None:
        try:
            await stub.Release(pb.ReleaseRequest(transfer_id=transfer_id, reason="stream never opened"), timeout=5)
        except grpc.aio.AioRpcError as e:  # the replica is gone, and its blocks with it
            log.warning("could not release reservation %d: %s", transfer_id, e.details())

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]


def _maybe(logprobs: list[float | None], wanted: bool) -> tuple[float, ...] | None:
    return tuple(lp or 0.0 for lp in logprobs) if wanted else None


def _error(chunk: pb.TokenChunk, replica: str) -> GenerationError:
    cls = _ERROR_CODES.get(chunk.error_code, Unavailable)
    return cls(f"decode replica {replica}: {chunk.error}")


def _rpc_error(e: grpc.aio.AioRpcError, replica: str) -> GenerationError:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the request's deadline passed while decoding")
    return Unavailable(f"decode replica {replica} failed: {e.code().name}: {e.details()}")
