"""The serving pipeline behind the public APIs: reserve → prefill → stream.

For each `GenerationRequest`:
1. reserve KV blocks on a decode replica, chosen from the router's own view of
   the pool (router/directory.py) and called on its stream server: a full KV pool
   is retried elsewhere or later until the deadline, full queues everywhere are
   refused at once (429);
2. prefill on a prefill replica, chosen the same way and called on its own server,
   which pushes the KV straight into those blocks and returns the first token —
   unless the request prefills on the decode replica itself (colocated pools, short
   prompts), which then reserves and opens it in one call;
3. open the reservation on the router's subscription to that decode replica
   (router/decode_streams.py: one gRPC stream per replica carries every request's
   tokens, a message per engine step) and relay its tokens, detokenized and cut
   at stop strings.
No Ray call is on a request's path.
A reservation that is not seen to its end (never opened, the client left, a stop
string matched) is released, which frees its blocks on the decode replica at once.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import pickle
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc

from pdserve.engine.messages import (PrefillRequest, PrefillResult, PromptLogprob, Reservation, SamplingParams,
                                     TopLogprobs)
from pdserve.engine.sealed import seal
from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc
from pdserve.protos.pdserve.v1 import prefill_pb2, prefill_pb2_grpc

from .directory import DecodeDirectory, PrefillDirectory, Replica
from .channels import Channels
from .decode_streams import DecodeStreams, Feed, FeedItem, StreamLost, Subscription
from .generation import (
    DeadlineExceeded, GenerationChunk, GenerationError, GenerationRequest, HealthStatus, InvalidRequest,
    Overloaded, PhaseTimings, SamplingOptions, TransferFailed, Unavailable, Usage, failure_error,
)
from .metrics import RouterMetrics
from .relay import TextRelay

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 20  # bounded anyway by the request's deadline
MAX_TRANSFER_RETRIES = 1  # a handoff that failed is retried once through another pair
RETRY_BACKOFF_S = 0.25
RESERVE_TIMEOUT_S = 10.0  # one Reserve call (the replica answers at once, or is gone)


@dataclass(frozen=True)
class PipelineSettings:
    colocated: bool
    short_prompt_tokens: int  # prompts shorter than this prefill on the decode replica
    call_secret: str  # seals the calls to prefill replicas (engine/sealed.py)
    stream_interval: int  # a request's tokens leave the decode replica every this many
    reserve_retry_s: float = 0.05


class Pipeline:
    """A `GenerationBackend` over a prefill pool and a decode pool (or one colocated pool)."""

    def __init__(self, prefill: PrefillDirectory | None, decode: DecodeDirectory, tokenizer: Any,
                 eos_token_ids: tuple[int, ...], settings: PipelineSettings, metrics: RouterMetrics | None = None):
        self.prefill = prefill  # None when colocated
        self.decode = decode  # the decode (or colocated) pool
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.settings = settings
        self.metrics = metrics or RouterMetrics()
        self._channels = Channels()
        self._streams = DecodeStreams(self._channels)
        self._background: set[asyncio.Task] = set()

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
        """Attempts until one finishes: a replica lost mid-request costs the client no token."""
        s = request.sampling
        relay = TextRelay(self.tokenizer, s.stop, s.min_tokens, s.skip_special_tokens, s.include_stop_str_in_output)
        run = _Run(request, time.monotonic(), relay, s.seed if s.seed is not None else random.getrandbits(63))
        transfer_failures = 0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async for chunk in self._attempt(run):
                    yield chunk
                return
            except _Retriable as e:
                transfer_failures += e.is_transfer
                if (attempt == MAX_ATTEMPTS or time.time() >= request.deadline
                        or transfer_failures > MAX_TRANSFER_RETRIES):
                    raise Unavailable(f"{e} (after {attempt} attempts)") from None
                log.warning("[%s] %s; continuing elsewhere with %d tokens already sent (attempt %d)",
                            request.request_id, e, len(run.generated), attempt + 1)
                await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** min(attempt, 3), max(request.deadline - time.time(), 0)))

    async def _attempt(self, run: "_Run") -> AsyncIterator[GenerationChunk]:
        """One try: reserve, prefill (unless the decode replica does it), stream until finished."""
        request = run.request
        # After a failure the new decode replica re-prefills prompt + tokens sent itself.
        local = (self.settings.colocated or bool(run.generated)
                 or len(request.prompt_token_ids) < self.settings.short_prompt_tokens)
        held = await self._reserve(run, local)
        reservation, subscription, feed = held.reservation, held.subscription, held.feed
        ended = False
        try:
            if not local:
                result = await self._prefill(request, reservation, run.seed)
                run.timings.update(queue_s=result.queue_s, prefill_s=result.prefill_s,
                                   kv_transfer_s=result.transfer_wait_s, kv_bytes=result.kv_bytes,
                                   prefill_replica=result.replica_id)
                yield run.accept([result.first_token], [result.first_logprob], [result.first_top_logprobs],
                                 result.prompt_logprobs)
                if run.relay.is_stopped or run.is_done():
                    yield self._last(run, "length", reservation)  # _last says "stop" for a stop string
                    return
                feed = subscription.feed(reservation.transfer_id)
                await subscription.stub.Open(
                    self._stream_request(run, local, subscription.subscriber_id, reservation.transfer_id),
                    timeout=max(min(request.deadline - time.time(), 30.0), 0.001))
            while True:
                item = await self._next(feed, request, reservation)
                if item.token_ids:
                    yield run.accept(item.token_ids, item.logprobs, item.top_logprobs, item.prompt_logprobs)
                    if run.relay.is_stopped:
                        yield self._last(run, "stop", reservation)
                        return
                if item.ending is not None:
                    ended = True
                    if item.ending.error:
                        raise _ending_error(item.ending, reservation.replica_id)
                    if local and item.ending.timings.prefill_s:
                        run.timings.update(queue_s=item.ending.timings.queue_s, prefill_s=item.ending.timings.prefill_s,
                                           prefill_replica=reservation.replica_id)
                    yield self._last(run, item.ending.finish_reason, reservation)
                    return
        except grpc.aio.AioRpcError as e:
            raise _Retriable(f"decode replica {reservation.replica_id} failed: {e.code().name}: {e.details()}") from None
        finally:
            subscription.forget(reservation.transfer_id)
            if not ended:  # detached: this runs even when the client has gone; frees the blocks at once
                self._detached(self._release(reservation))

    async def _next(self, feed: Any, request: GenerationRequest, reservation: Reservation) -> FeedItem:
        """The request's next tokens or ending; its deadline bounds the wait."""
        try:
            item = await feed.next(max(request.deadline - time.time(), 0.001))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while decoding") from None
        if item.lost and not item.token_ids and item.ending is None:
            raise _Retriable(f"decode replica {reservation.replica_id}: {item.lost}")
        return item

    async def health(self) -> HealthStatus:
        pools = {"decode": self.decode} if self.prefill is None else {"prefill": self.prefill, "decode": self.decode}
        counts = {name: await directory.count() for name, directory in pools.items()}
        for name, count in counts.items():
            if not count:
                return HealthStatus(False, 0, 0, f"{name} pool not ready: no replica has reported yet")
        return HealthStatus(True, counts.get("prefill", 0), counts["decode"])

    async def _reserve(self, run: "_Run", local: bool) -> "_Held":
        """Blocks on some decode replica (opened there at once when `local`); waits, within the
        deadline, while none can take the request.

        The call runs detached: a client leaving mid-call must not orphan blocks the replica
        already reserved, so a reservation that arrives after the caller left is released.
        """
        call = self._detached(self._reserve_until_deadline(run, local))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._release_orphan)
            raise

    async def _reserve_until_deadline(self, run: "_Run", local: bool) -> "_Held":
        request = run.request
        while True:
            refusals = []
            for replica in await self.decode.ranked():
                try:
                    held = await self._reserve_on(replica, run, local)
                except _Refused as e:
                    refusals.append(e)
                    continue
                self.decode.reserved(replica, len(request.prompt_token_ids) + request.sampling.max_tokens)
                return held
            if refusals and all(r.queue_full for r in refusals):
                raise Overloaded(f"{refusals[0]}", retry_after_s=1.0)
            if time.time() + self.settings.reserve_retry_s > request.deadline:
                why = refusals[0] if refusals else "no decode replica is up"
                raise Unavailable(f"no decode replica could take the request before its deadline: {why}")
            await asyncio.sleep(self.settings.reserve_retry_s)

    async def _reserve_on(self, replica: Replica, run: "_Run", local: bool) -> "_Held":
        """Reserve (and open, when `local`) on one replica; `_Refused` when it cannot take the request now."""
        request = run.request
        try:
            subscription = await self._streams.subscription(replica.address)
        except (StreamLost, asyncio.TimeoutError) as e:
            self.decode.failed(replica.replica_id)
            raise _Refused(f"decode replica {replica.replica_id}: cannot subscribe: {e}") from None
        call = pb.ReserveRequest(request_id=request.request_id, num_prompt_tokens=len(request.prompt_token_ids),
                                 max_tokens=request.sampling.max_tokens, deadline_unix_s=request.deadline,
                                 call_id=uuid.uuid4().hex)
        if local:
            call.open.CopyFrom(self._stream_request(run, local, subscription.subscriber_id))
        try:
            with subscription.expecting():
                reply = await subscription.stub.Reserve(
                    call, timeout=max(min(request.deadline - time.time(), RESERVE_TIMEOUT_S), 0.001))
                feed = subscription.feed(reply.transfer_id) if local else None
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
                self.decode.failed(replica.replica_id)  # gone or hung, not a refusal
                # it may have reserved all the same (a late answer): free that, or refuse the call if it comes
                self._detached(self._release_call(replica.address, call.call_id))
            raise _Refused(f"decode replica {replica.replica_id}: {e.details()}",
                           queue_full=code == grpc.StatusCode.RESOURCE_EXHAUSTED) from None
        destination = pickle.loads(reply.destination) if reply.destination else None  # our own replica's
        reservation = Reservation(reply.transfer_id, destination, replica.address, reply.replica_id)
        return _Held(reservation, subscription, feed)

    def _release_orphan(self, call: asyncio.Task) -> None:
        if not call.cancelled() and call.exception() is None:
            held = call.result()
            held.subscription.forget(held.reservation.transfer_id)
            self._detached(self._release(held.reservation))

    def _detached(self, work: Any) -> asyncio.Task:
        """A task outside the request's context: neither the client leaving nor Ray Serve's
        propagation of that cancellation to child calls interrupts it."""
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _prefill(self, request: GenerationRequest, reservation: Reservation, seed: int) -> PrefillResult:
        """The prompt's first token, from the best prefill replica that takes it."""
        prefill = PrefillRequest(request.request_id, tuple(request.prompt_token_ids),
                                 _sampling_params(request.sampling, seed), reservation.destination, request.deadline,
                                 frozenset(self._stop_ids(request.sampling)))
        payload, signature = seal(prefill, self.settings.call_secret)
        call = prefill_pb2.PrefillCall(request=payload, signature=signature)
        while True:
            full = []
            for replica in await self.prefill.ranked(request.prompt_token_ids):
                self.prefill.sent(replica, len(request.prompt_token_ids))
                try:
                    return await self._prefill_on(replica, call, request)
                except _Refused as e:
                    full.append(e)
            if full:  # every replica's queue is full
                raise Overloaded(str(full[0]), retry_after_s=1.0)
            if time.time() + self.settings.reserve_retry_s > request.deadline:
                raise Unavailable("no prefill replica is up")
            await asyncio.sleep(self.settings.reserve_retry_s)

    async def _prefill_on(self, replica: Replica, call: prefill_pb2.PrefillCall,
                          request: GenerationRequest) -> PrefillResult:
        stub = prefill_pb2_grpc.PrefillStub(self._channels.get(replica.address))
        try:
            reply = await stub.Prefill(call, timeout=max(request.deadline - time.time(), 0.001))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _Refused(e.details(), queue_full=True) from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded("the request's deadline passed during its prefill") from None
            self.prefill.failed(replica.replica_id)  # the replica died: Serve brings one back within the deadline
            raise _Retriable(f"prefill replica {replica.replica_id} failed: {e.code().name}: {e.details()}") from None
        if not reply.error:
            return pickle.loads(reply.result)
        error = failure_error(reply.error_code, reply.error)
        if isinstance(error, TransferFailed):  # another pair may do; a handoff that keeps failing is an error
            raise _Retriable(f"prefill failed: {error.message}", is_transfer=True)
        if isinstance(error, (InvalidRequest, DeadlineExceeded)):
            raise error
        raise _Retriable(f"prefill failed: {error.message}")

    def _stream_request(self, run: "_Run", local: bool, subscriber_id: str, transfer_id: int = 0) -> pb.StreamRequest:
        """What the decode replica runs; `transfer_id` 0 inside a Reserve (the reservation's own is used)."""
        s = run.request.sampling
        return pb.StreamRequest(
            request_id=run.request.request_id, transfer_id=transfer_id,
            prompt_token_ids=run.request.prompt_token_ids, generated_token_ids=run.generated,
            prefill_locally=local, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, seed=run.seed, stop_token_ids=sorted(self._stop_ids(s)), logprobs=s.logprobs,
            deadline_unix_s=run.request.deadline, subscriber_id=subscriber_id,
            stream_interval=self.settings.stream_interval, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens, logit_bias=dict(s.logit_bias), top_logprobs=s.top_logprobs, min_p=s.min_p,
            # a re-prefill after a failover scores nothing: the client has the prompt's already
            prompt_logprobs=s.prompt_logprobs if local and not run.generated else None,
        )

    def _stop_ids(self, s: SamplingOptions) -> set[int]:
        """The token ids that end a request: its stop_token_ids, and EOS unless it ignores EOS."""
        return set(s.stop_token_ids) | (set() if s.ignore_eos else set(self.eos_token_ids))

    def _last(self, run: "_Run", reason: str, reservation: Reservation) -> GenerationChunk:
        """The closing chunk: held-back text, finish reason, usage and timings."""
        tail = run.relay.finish()
        e2e = time.monotonic() - run.received
        ttft = (run.first_token_at or time.monotonic()) - run.received
        decode_s = max(e2e - ttft, 0.0)
        return GenerationChunk(
            (), tail.text, finish_reason="stop" if run.relay.is_stopped else reason,
            usage=Usage(len(run.request.prompt_token_ids), len(run.generated)),
            timings=PhaseTimings(ttft_s=ttft, e2e_s=e2e, decode_s=decode_s,
                                 tpot_s=decode_s / max(len(run.generated) - 1, 1),
                                 decode_replica=reservation.replica_id, **run.timings),
        )

    async def _release(self, reservation: Reservation) -> None:
        await self._send_release(reservation.stream_address, pb.ReleaseRequest(
            transfer_id=reservation.transfer_id, reason="not seen to its end by the router"))

    async def _release_call(self, address: str, call_id: str) -> None:
        await self._send_release(address, pb.ReleaseRequest(call_id=call_id, reason="its Reserve call failed"))

    async def _send_release(self, address: str, release: pb.ReleaseRequest) -> None:
        stub = pb_grpc.DecodeStreamStub(self._channels.get(address))
        try:
            await stub.Release(release, timeout=5)
        except grpc.aio.AioRpcError as e:  # the replica is gone, and its blocks with it
            log.warning("could not release %s on %s: %s", release.call_id or release.transfer_id, address, e.details())


@dataclass(frozen=True)
class _Held:
    """A reservation, the subscription its tokens come on, and its feed once opened."""

    reservation: Reservation
    subscription: Subscription
    feed: Feed | None


class _Refused(Exception):
    """One decode replica cannot take the request now; `queue_full`: its waiting queue is full."""

    def __init__(self, message: str, queue_full: bool = False):
        super().__init__(message)
        self.queue_full = queue_full


class _Retriable(Exception):
    """A failure another replica may not have: the request goes on elsewhere."""

    def __init__(self, message: str, is_transfer: bool = False):
        super().__init__(message)
        self.is_transfer = is_transfer


@dataclass
class _Run:
    """One request across its attempts: what the client has been sent so far."""

    request: GenerationRequest
    received: float
    relay: TextRelay
    seed: int  # fixed for the request: sampling is a function of (seed, position), so a resume is exact
    generated: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    first_token_at: float | None = None

    def accept(self, token_ids: list[int], logprobs: list[float | None], tops: list[TopLogprobs],
               prompt_logprobs: tuple[PromptLogprob, ...] = ()) -> GenerationChunk:
        """The chunk of tokens received; their logprobs (and with the first, the prompt's) only where the
        request asked for them."""
        self.first_token_at = self.first_token_at or time.monotonic()
        self.generated.extend(token_ids)
        out = self.relay.add(token_ids)
        s = self.request.sampling
        prompt = prompt_logprobs if s.prompt_logprobs is not None and prompt_logprobs else None
        if not s.logprobs:
            return GenerationChunk(tuple(token_ids), out.text, prompt_logprobs=prompt)
        return GenerationChunk(tuple(token_ids), out.text, tuple(lp or 0.0 for lp in logprobs), tuple(tops),
                               prompt_logprobs=prompt)

    def is_done(self) -> bool:
        """All max_tokens sent (the first token alone can be all of them)."""
        return len(self.generated) >= self.request.sampling.max_tokens


def _sampling_params(s: SamplingOptions, seed: int) -> SamplingParams:
    """The engine's sampling parameters of a request (the prefill replica's first token)."""
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, logprobs=s.logprobs,
                          top_logprobs=s.top_logprobs, min_p=s.min_p, presence_penalty=s.presence_penalty,
                          frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
                          min_tokens=s.min_tokens, logit_bias=s.logit_bias, prompt_logprobs=s.prompt_logprobs)


def _ending_error(ending: pb.Ending, replica: str) -> Exception:
    """A decode failure: the request's own (deadline, invalid) ends it; the replica's is retried elsewhere."""
    error = failure_error(ending.error_code, f"decode replica {replica}: {ending.error}")
    if isinstance(error, (DeadlineExceeded, InvalidRequest)):
        return error
    return _Retriable(error.message, is_transfer=isinstance(error, TransferFailed))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
