"""The bench's clients: one streamed request in, one `RequestRecord` out, over HTTP (SSE) or gRPC.

A record keeps the client's own clock (send, each chunk, end) and the server's
`pdserve_timings`, so a run can be judged from outside and explained from inside.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import grpc
import httpx

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.router.generation import PhaseTimings

from .workload import RequestSpec

TIMING_FIELDS = tuple(f.name for f in fields(PhaseTimings))  # the server's pdserve_timings


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds, `chunk_s` from the send."""

    sent_at: float  # seconds after the run began
    max_tokens: int
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried text or tokens
    e2e_s: float | None = None
    error: str | None = None
    server: dict[str, Any] | None = None  # the server's pdserve_timings
    client: int = 0  # the client process that sent it (bench --processes)

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.e2e_s is not None and self.output_tokens > 0

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] if self.chunk_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with a single token."""
        if not self.is_ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.chunk_s[0]) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive chunks (one token each, unless the server packed several)."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]


class BenchClient(Protocol):
    async def send(self, spec: RequestSpec, record: RequestRecord) -> None: ...

    async def close(self) -> None: ...


class HttpClient:
    """Streams `/v1/completions` with `ignore_eos`, greedy, usage included."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits)

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        body = {"prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    self.take_event(json.loads(line[6:]), record, time.perf_counter() - started)
            record.e2e_s = time.perf_counter() - started
        except httpx.HTTPError as e:
            record.error = f"{type(e).__name__}: {e}"

    async def close(self) -> None:
        await self._http.aclose()

    def take_event(self, event: dict, record: RequestRecord, at: float) -> None:
        """One SSE event into the record (a subclass may do more with it: the bench's consumer is this)."""
        _take_event(event, record, at)


def _take_event(event: dict, record: RequestRecord, at: float) -> None:
    if "error" in event:
        record.error = event["error"].get("message", "error")
        return
    if any(choice.get("text") for choice in event.get("choices", ())):
        record.chunk_s.append(at)
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage["prompt_tokens"]
        record.output_tokens = usage["completion_tokens"]
        record.server = _kept(usage.get("pdserve_timings"))


class GrpcClient:
    """Streams `pdserve.v1.Generation/Generate`; token counts per message are exact.

    Requests take `num_channels` connections in turn: router replicas share a port and the kernel
    spreads connections, not requests, so one connection would load one router (as HTTP's pool of
    connections does not)."""

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float = 600.0, num_channels: int = 8):
        # a local subchannel pool each: channels to one address otherwise share one connection
        self._channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                          for _ in range(num_channels)]
        self._stubs = itertools.cycle([pb_grpc.GenerationStub(channel) for channel in self._channels])
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._timeout_s = timeout_s

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        sampling = pb.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
        request = (pb.GenerateRequest(prompt_token_ids=spec.prompt, sampling=sampling) if isinstance(spec.prompt, list)
                   else pb.GenerateRequest(prompt=spec.prompt, sampling=sampling))
        started = time.perf_counter()
        try:
            async for response in next(self._stubs).Generate(request, metadata=self._metadata, timeout=self._timeout_s):
                if response.token_ids:
                    record.chunk_s.append(time.perf_counter() - started)
                    record.output_tokens += len(response.token_ids)
                if response.HasField("usage"):
                    record.prompt_tokens = response.usage.prompt_tokens
                if response.HasField("timings"):
                    record.server = {name: getattr(response.timings, name) for name in TIMING_FIELDS}
            record.e2e_s = time.perf_counter() - started
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _kept(timings: dict | None) -> dict | None:
    return None if timings is None else {name: timings[name] for name in TIMING_FIELDS if name in timings}
