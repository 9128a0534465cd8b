"""The gRPC API (`pdserve.v1.Generation`): `Generate` and `Health` over a `GenerationBackend`.

The servicer of `router/ingress.py` calls these methods with its call's context
(`grpc.aio.ServicerContext`). A failing method sets the code and details on the
context and then raises; the servicer ends the call with that status, mid-stream
or not. The context is duck-typed here (`set_code`, `set_details`,
`invocation_metadata`), so the front end runs on any gRPC server.

`Generate` checks the request as the HTTP API does (same limits, same messages),
then relays the backend's chunks: token ids and text in every message;
finish_reason, usage (the router's count) and timings on the last one.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator, NoReturn, Protocol

import grpc

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.router.auth import ApiKey
from pdserve.router.errors import InternalError, InvalidParameter, grpc_details, grpc_status
from pdserve.router.generation import (
    GenerationBackend, GenerationError, GenerationRequest, SamplingOptions,
)
from pdserve.router.limits import (
    MAX_LOGPROBS, RequestLimits, check_logit_bias, check_min_tokens, check_penalties, check_sampling,
)
from pdserve.router.served_models import ServedModels
from pdserve.router.text import check_token_ids, encode_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # `max_tokens: 0` in the proto


class GrpcContext(Protocol):
    def set_code(self, code: grpc.StatusCode) -> None: ...

    def invocation_metadata(self) -> list[tuple[str, str]]: ...

    def set_details(self, details: str) -> None: ...


class GrpcFrontEnd:
    """`Generate` and `Health` of the public gRPC service, over a `GenerationBackend`."""

    def __init__(self, backend: GenerationBackend, tokenizer: Any, models: ServedModels, limits: RequestLimits,
                 api_key: ApiKey | None = None):
        self.backend = backend
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.models = models
        self.limits = limits

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: GrpcContext | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the completion of one prompt; failures end the call with their status."""
        try:
            if self.api_key is not None:
                self.api_key.check_metadata(grpc_context.invocation_metadata() if grpc_context else ())
            generation = self._generation_request(request)
            num_tokens = 0
            async with contextlib.aclosing(self._relay(generation)) as messages:
                async for message in messages:
                    num_tokens += len(message.token_ids)
                    if message.finish_reason:
                        message.usage.CopyFrom(pb.Usage(prompt_tokens=len(generation.prompt_token_ids),
                                                        completion_tokens=num_tokens))
                    yield message
        except Exception as error:
            _fail(grpc_context, error, request.request_id)

    async def Health(self, request: pb.HealthRequest,
                     grpc_context: GrpcContext | None = None) -> pb.HealthResponse:
        """The backend's readiness, always with status OK: `ready` tells (a failed check is not ready)."""
        try:
            health = await self.backend.health()
        except Exception as error:
            return pb.HealthResponse(ready=False, status=f"health check failed: {error}")
        return pb.HealthResponse(
            ready=health.ready, status=health.detail or ("ok" if health.ready else "unavailable"),
            prefill_replicas=health.prefill_replicas, decode_replicas=health.decode_replicas,
        )

    def _generation_request(self, request: pb.GenerateRequest) -> GenerationRequest:
        """Check a `GenerateRequest` and turn it into the backend's request."""
        self.models.check(request.model)  # proto3: an empty `model` is none named
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise InvalidParameter("Set exactly one of `prompt` and `prompt_token_ids`.", "prompt")
        if request.prompt:
            prompt = encode_text(request.prompt, self.tokenizer)
        else:
            prompt = list(request.prompt_token_ids)
            check_token_ids(prompt, self.tokenizer, "prompt_token_ids")
        self.limits.check_prompt_length(len(prompt))
        params = request.sampling
        top_p = params.top_p or 1.0
        check_sampling(params.temperature, top_p, params.top_k, params.min_p)
        _check_top_logprobs(params)
        stop = tuple(params.stop)
        self.limits.check_stop(stop)
        max_tokens = self.limits.resolve_max_tokens(params.max_tokens or None, len(prompt), DEFAULT_MAX_TOKENS)
        sampling = SamplingOptions(
            max_tokens=max_tokens, temperature=params.temperature, top_p=top_p, top_k=max(params.top_k, 0),
            seed=params.seed if params.HasField("seed") else None, stop=stop,
            ignore_eos=params.ignore_eos, logprobs=params.logprobs > 0, top_logprobs=params.top_logprobs,
            min_p=params.min_p, prompt_logprobs=params.prompt_logprobs if params.HasField("prompt_logprobs") else None,
            **self._penalties(params),
        )
        return GenerationRequest(request.request_id or uuid.uuid4().hex, tuple(prompt), sampling,
                                 self.limits.deadline())

    def _penalties(self, params: pb.SamplingParams) -> dict:
        """The penalties, min_tokens and logit_bias of `SamplingOptions`, checked as the HTTP API checks them."""
        repetition = params.repetition_penalty if params.HasField("repetition_penalty") else 1.0
        check_penalties(params.presence_penalty, params.frequency_penalty, repetition, params.min_tokens)
        check_min_tokens(params.min_tokens, params.max_tokens or None)
        check_token_ids(list(params.logit_bias), self.tokenizer, "logit_bias")
        return dict(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                    repetition_penalty=repetition, min_tokens=params.min_tokens,
                    logit_bias=check_logit_bias(dict(params.logit_bias)))

    async def _relay(self, request: GenerationRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The backend's chunks as messages; closing the relay closes the backend's stream."""
        stream = self.backend.generate(request)
        try:
            async for chunk in stream:
                message = pb.GenerateResponse(
                    token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs or (),
                    finish_reason=chunk.finish_reason or "", request_id=request.request_id,
                )
                if request.sampling.top_logprobs:
                    for top in chunk.top_logprobs or ():
                        message.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
                for scored in chunk.prompt_logprobs or ():
                    message.prompt_logprobs.add(token_id=scored.token_id, logprob=scored.logprob, rank=scored.rank,
                                                top=pb.TopLogprobs(token_ids=[t for t, _ in scored.top],
                                                                   logprobs=[lp for _, lp in scored.top]))
                if chunk.timings is not None:
                    message.timings.CopyFrom(pb.PhaseTimings(**asdict(chunk.timings)))
                yield message
        finally:
            await stream.aclose()


def _check_top_logprobs(params: pb.SamplingParams) -> None:
    """Refuse more alternatives than vLLM's default --max-logprobs (per token or prompt token), or
    alternatives without logprobs."""
    if params.top_logprobs > MAX_LOGPROBS:
        raise InvalidParameter(f"`top_logprobs` must be at most {MAX_LOGPROBS}, got {params.top_logprobs}.",
                               "top_logprobs", "invalid_value")
    if params.top_logprobs and not params.logprobs:
        raise InvalidParameter("`top_logprobs` requires `logprobs` > 0.", "top_logprobs", "invalid_value")
    if params.prompt_logprobs > MAX_LOGPROBS:
        raise InvalidParameter(f"`prompt_logprobs` must be at most {MAX_LOGPROBS}, got {params.prompt_logprobs}.",
                               "prompt_logprobs", "invalid_value")


def _fail(grpc_context: GrpcContext | None, error: Exception, request_id: str) -> NoReturn:
    """Set the status of `error` on the call's context and raise it, as Ray Serve expects."""
    if isinstance(error, GenerationError):
        failure = error
    else:
        logger.exception("request %s failed", request_id or "(no id)", exc_info=error)
        failure = InternalError("The server had an error while processing your request.")
    if grpc_context is not None:
        grpc_context.set_code(grpc_status(failure))
        grpc_context.set_details(grpc_details(failure))
    if failure is error:
        raise error
    raise failure from error
