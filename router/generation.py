"""What the public APIs ask of the serving pipeline, and what they get back.

The HTTP and gRPC front ends turn a user's request into `GenerationRequest`s
(one per completion choice) and relay the `GenerationChunk`s of a
`GenerationBackend` (the disaggregated pipeline, or the colocated one). Failures
reach them as the typed errors below, mapped once to HTTP and gRPC statuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncGenerator, Protocol

from pdserve.engine.failures import FailureCode
from pdserve.engine.messages import PromptLogprob, TopLogprobs


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the this many most likely tokens at each step too
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs and this many alternatives (None: off)
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # the penalties, min_tokens and logit_bias: vLLM's (engine/penalties.py)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS, stop ids and stop strings end nothing before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    skip_special_tokens: bool = True  # the text leaves special tokens out
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions
    deadline: float  # time.time() after which the request fails with DeadlineExceeded


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class PhaseTimings:
    """Where a request's time went, in seconds (the fields of protos' PhaseTimings)."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    kv_bytes: int = 0
    prefill_replica: str = ""
    decode_replica: str = ""


@dataclass(frozen=True)
class GenerationChunk:
    """New tokens and the text they complete; the last chunk has finish_reason, usage, timings."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[TopLogprobs, ...] | None = None  # one per token, with `logprobs`
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None  # the first chunk's, with `prompt_logprobs`
    finish_reason: str | None = None  # "stop" | "length"
    usage: Usage | None = None
    timings: PhaseTimings | None = None


@dataclass(frozen=True)
class HealthStatus:
    ready: bool
    prefill_replicas: int
    decode_replicas: int
    detail: str = ""


class GenerationBackend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]: ...

    async def health(self) -> HealthStatus: ...


class GenerationError(Exception):
    """Base of the failures a front end maps to a status; `message` is for the user."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(GenerationError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Overloaded(GenerationError):
    """Queues full: refuse at once, with Retry-After."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(GenerationError):
    """No replica of a pool could serve within the deadline."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class TransferFailed(Unavailable):
    """The KV handoff between a prefill and a decode replica failed."""


class DeadlineExceeded(GenerationError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


# The one mapping of a worker's FailureCode to the error the front ends answer with.
_FAILURE_ERRORS: dict[FailureCode, type[GenerationError]] = {
    FailureCode.DEADLINE: DeadlineExceeded,
    FailureCode.INVALID: InvalidRequest,
    FailureCode.TRANSFER_FAILED: TransferFailed,
    FailureCode.UNAVAILABLE: Unavailable,
    FailureCode.CANCELLED: Unavailable,
}


def failure_error(code: FailureCode | str, message: str) -> GenerationError:
    """The error a worker's failure becomes at the edge (unknown codes: Unavailable)."""
    try:
        return _FAILURE_ERRORS[FailureCode(code)](message)
    except ValueError:
        return Unavailable(message)
