"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

A call's life: read the body (size-capped) → check it field by field (every
refusal is a 400/404/413 with an OpenAI `{"error": ...}` body; FastAPI's 422 is
never used) → tokenize (chat: render the template) → one `GenerationRequest` per
choice, prompt-major → run them concurrently on the backend → answer one JSON
body, or SSE chunks ending in `data: [DONE]`.

pdserve extensions: `top_k`, `ignore_eos`, `stop_token_ids` (as in vLLM), and
`usage.pdserve_timings`, the `PhaseTimings` of the choice that finished last.
When streaming, those timings ride as a top-level `pdserve_timings` key on the
last content chunk (the one whose `finish_reason` ends the request), and inside
`usage` of the usage chunk when `stream_options.include_usage` is set; no extra
empty-choices chunk is sent unless usage is asked for.

A failure before the first token answers with its status; after streaming
began it becomes `data: {"error": {...}}` then `data: [DONE]`. A client that
disconnects cancels its backend generators at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar, Literal, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.router.chat import parse_messages, render_chat
from pdserve.router.errors import (
    InternalError, InvalidParameter, ModelNotFound, PayloadTooLarge, openai_error_body, retry_after_seconds,
)
from pdserve.router.generation import (
    GenerationBackend, GenerationChunk, GenerationError, GenerationRequest, PhaseTimings, SamplingOptions,
)
from pdserve.router.limits import RequestLimits, check_sampling
from pdserve.router.text import check_token_ids, prompt_token_ids, token_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the context left


# ---- request bodies -------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _CommonBody(BaseModel):
    """Fields both endpoints take; unknown fields and wrong JSON types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # as in vLLM: absent means the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None  # accepted, unused
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    # field -> the one value pdserve accepts besides null: OpenAI features it does not serve
    neutral_values: ClassVar[dict[str, Any]] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}}
    prompt_field: ClassVar[str]

    def check_unsupported(self) -> None:
        """Refuse OpenAI features pdserve does not serve, unless set to their neutral value."""
        for name, neutral in self.neutral_values.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise InvalidParameter(f"`{name}` is not supported by pdserve.", name, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options", "invalid_value",
            )

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for, and the field that asked."""
        return self.max_tokens, "max_tokens"

    def wants_logprobs(self) -> bool:
        raise NotImplementedError


class CompletionBody(_CommonBody):
    prompt: Any  # text, token ids, or a list of either: checked by `text.prompt_token_ids`
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    neutral_values = {**_CommonBody.neutral_values, "echo": False, "suffix": "", "best_of": 1}
    prompt_field = "prompt"

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class ChatBody(_CommonBody):
    messages: Any  # checked by `chat.parse_messages`
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    prompt_field = "messages"

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameter("`top_logprobs` requires `logprobs` to be true.", "top_logprobs", "invalid_value")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidParameter("Set `max_tokens` or `max_completion_tokens`, not both.",
                                   "max_completion_tokens", "invalid_value")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def wants_logprobs(self) -> bool:
        return self.logprobs


def _parse_body(cls: type[_CommonBody], payload: dict) -> Any:
    """Validate `payload` into `cls`, turning the first problem into an OpenAI-style 400."""
    try:
        body = cls.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise InvalidParameter(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if first["type"] == "missing":
            raise InvalidParameter(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
        raise InvalidParameter(f"Invalid value for '{name}': {first['msg']}.", name, code) from None
    body.check_unsupported()
    return body


# ---- from a body to backend requests ---------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """The backend requests of one call, prompt-major: choice i is request i."""

    requests: list[GenerationRequest]
    prompt_tokens: int  # each prompt counted once, whatever n is
    logprobs: bool


def _plan(body: _CommonBody, prompts: list[list[int]], default_max_tokens: int, request_id: str,
          limits: RequestLimits, tokenizer: Any) -> _Plan:
    """Check the sampling fields against the limits and fan the prompts out into n requests each."""
    limits.check_n(body.n)
    check_sampling(body.temperature, body.top_p, body.top_k)
    stop = body.stop_strings()
    limits.check_stop(stop)
    stop_token_ids = tuple(body.stop_token_ids or ())
    check_token_ids(list(stop_token_ids), tokenizer, "stop_token_ids")
    requested_max, max_param = body.requested_max_tokens()
    logprobs = body.wants_logprobs()
    deadline = limits.deadline()
    requests = []
    for ids in prompts:
        limits.check_prompt_length(len(ids), body.prompt_field)
        max_tokens = limits.resolve_max_tokens(requested_max, len(ids), default_max_tokens, max_param)
        for j in range(body.n):
            sampling = SamplingOptions(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                seed=None if body.seed is None else body.seed + j, stop=stop, stop_token_ids=stop_token_ids,
                ignore_eos=body.ignore_eos, logprobs=logprobs,
            )
            choice_id = f"{request_id}-{len(requests)}"
            requests.append(GenerationRequest(choice_id, tuple(ids), sampling, deadline))
    return _Plan(requests, sum(len(ids) for ids in prompts), logprobs)


# ---- running the choices ---------------------------------------------------------------------

async def _merged(backend: GenerationBackend,
                  requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Run every request at once and yield `(choice index, chunk)` as chunks arrive.

    The first failure ends the merge; closing it (or cancelling its consumer)
    closes every backend generator.
    """
    queue: asyncio.Queue[tuple[int, GenerationChunk | Exception | None]] = asyncio.Queue(len(requests))

    async def pump(index: int, request: GenerationRequest) -> None:
        stream = backend.generate(request)
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except Exception as error:  # handed to the consumer, which raises it
            await queue.put((index, error))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    timings: PhaseTimings | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.num_chars += len(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs or ())
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.timings = chunk.timings or self.timings


def _usage(plan: _Plan, states: list[_ChoiceState]) -> dict:
    """OpenAI usage (the router's own count of what it relayed) plus `pdserve_timings`."""
    completion = sum(len(s.token_ids) for s in states)
    return {
        "prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion, "pdserve_timings": _request_timings(states),
    }


def _request_timings(states: list[_ChoiceState]) -> dict | None:
    """The timings of the choice that finished last (its e2e is the request's)."""
    timed = [s.timings for s in states if s.timings is not None]
    return asdict(max(timed, key=lambda t: t.e2e_s)) if timed else None


# ---- the two response dialects ---------------------------------------------------------------

@dataclass(frozen=True)
class _Dialect:
    """How one endpoint spells its bodies: completions and chat differ only here."""

    kind: Literal["completion", "chat"]
    tokenizer: Any
    top_logprobs: int = 0  # chat: alternatives asked for (pdserve returns the chosen token only)

    @property
    def id_prefix(self) -> str:
        return "cmpl-" if self.kind == "completion" else "chatcmpl-"

    def object(self, streaming: bool) -> str:
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if streaming else "chat.completion"

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: list[float] | None,
               finish_reason: str | None, streaming: bool, text_offset: int = 0) -> dict:
        """One entry of `choices`: whole (a response) or a delta (a stream chunk)."""
        spelled = None if logprobs is None else self._logprobs(token_ids, logprobs, text_offset)
        if self.kind == "completion":
            body = {"index": index, "text": text}
        elif streaming:
            body = {"index": index, "delta": {"content": text} if text else {}}
        else:
            body = {"index": index, "message": {"role": "assistant", "content": text}}
        return {**body, "logprobs": spelled, "finish_reason": finish_reason}

    def role_choice(self, index: int) -> dict:
        """The first chat stream chunk of a choice, naming the assistant's role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _logprobs(self, token_ids: list[int], logprobs: list[float], text_offset: int) -> dict:
        tokens = [token_text(t, self.tokenizer) for t in token_ids]
        if self.kind == "completion":
            offsets = []
            for token in tokens:
                offsets.append(text_offset)
                text_offset += len(token)
            return {"tokens": tokens, "token_logprobs": list(logprobs),
                    "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)], "text_offset": offsets}
        content = []
        for token, lp in zip(tokens, logprobs):
            entry = {"token": token, "logprob": lp, "bytes": list(token.encode())}
            content.append({**entry, "top_logprobs": [entry] if self.top_logprobs else []})
        return {"content": content, "refusal": None}


# ---- the call --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Call:
    """One accepted API call, ready to run."""

    plan: _Plan
    dialect: _Dialect
    model: str
    request_id: str
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict], streaming: bool) -> dict:
        return {"id": self.dialect.id_prefix + self.request_id, "object": self.dialect.object(streaming),
                "created": self.created, "model": self.model, "choices": choices}

    async def respond(self, backend: GenerationBackend, request: Request) -> Response:
        """Run the call; until the response starts, a client that leaves cancels it (`_ClientGone`)."""
        events = _merged(backend, self.plan.requests)
        if not self.stream:
            body = await _unless_client_leaves(request, self._whole(events))
            return JSONResponse(body, headers={"X-Request-Id": self.request_id})
        try:  # the first event comes before the 200, so an early refusal keeps its status
            first = await _unless_client_leaves(request, anext(events, None))
        except BaseException:
            await events.aclose()
            raise
        return _EventStream(self._sse(events, first), close=events.aclose, media_type="text/event-stream",
                            headers={"X-Request-Id": self.request_id, "Cache-Control": "no-cache"})

    async def _whole(self, events: AsyncIterator[tuple[int, GenerationChunk]]) -> dict:
        states = [_ChoiceState() for _ in self.plan.requests]
        async with contextlib.aclosing(events):
            async for index, chunk in events:
                states[index].add(chunk)
        choices = [
            self.dialect.choice(i, "".join(s.text), s.token_ids, s.logprobs if self.plan.logprobs else None,
                                s.finish_reason, streaming=False)
            for i, s in enumerate(states)
        ]
        return {**self.envelope(choices, streaming=False), "usage": _usage(self.plan, states)}

    async def _sse(self, events: AsyncIterator[tuple[int, GenerationChunk]],
                   first: tuple[int, GenerationChunk] | None) -> AsyncIterator[str]:
        states = [_ChoiceState() for _ in self.plan.requests]
        extra = {"usage": None} if self.include_usage else {}
        try:
            if self.dialect.kind == "chat":
                for i in range(len(states)):
                    yield _sse_data({**self.envelope([self.dialect.role_choice(i)], True), **extra})
            async with contextlib.aclosing(events):
                pending = [first] if first is not None else []
                async for index, chunk in _prepend(pending, events):
                    yield _sse_data(self._chunk_body(index, chunk, states, extra))
            if self.include_usage:
                yield _sse_data({**self.envelope([], True), "usage": _usage(self.plan, states)})
        except Exception as error:
            yield _sse_data(openai_error_body(_as_generation_error(error, self.request_id)))
        yield "data: [DONE]\n\n"

    def _chunk_body(self, index: int, chunk: GenerationChunk, states: list[_ChoiceState], extra: dict) -> dict:
        state = states[index]
        offset = state.num_chars
        state.add(chunk)
        logprobs = list(chunk.logprobs or ()) if self.plan.logprobs else None
        choice = self.dialect.choice(index, chunk.text, list(chunk.token_ids), logprobs, chunk.finish_reason,
                                     streaming=True, text_offset=offset)
        body = {**self.envelope([choice], True), **extra}
        if chunk.finish_reason and all(s.finish_reason for s in states):
            body["pdserve_timings"] = _request_timings(states)
        return body


class _ClientGone(Exception):
    """The client disconnected before its response began."""


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and `_ClientGone` raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _prepend(head: list, rest: AsyncIterator) -> AsyncIterator:
    """`head`'s items, then `rest`'s."""
    for item in head:
        yield item
    async for item in rest:
        yield item


def _sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """A streaming response that stops its producer, and `close`s its source, as soon as the client goes away."""

    def __init__(self, content: AsyncIterator[str], close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.close_source = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            await self.close_source()


def _as_generation_error(error: Exception, request_id: str) -> GenerationError:
    """A `GenerationError` as is; anything else logged and hidden behind a 500."""
    if isinstance(error, GenerationError):
        return error
    logger.exception("request %s failed", request_id, exc_info=error)
    return InternalError("The server had an error while processing your request.")


# ---- the app ---------------------------------------------------------------------------------

def make_http_app(backend: GenerationBackend, tokenizer: Any, model_name: str, limits: RequestLimits) -> FastAPI:
    """The OpenAI-compatible FastAPI app serving `model_name` from `backend`."""
    app = FastAPI(title="pdserve", openapi_url=None)
    started = int(time.time())

    def completion_call(payload: dict, request_id: str) -> _Call:
        body = _parse_body(CompletionBody, payload)
        _check_model(body.model, model_name)
        prompts = prompt_token_ids(body.prompt, tokenizer)
        plan = _plan(body, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS, request_id, limits, tokenizer)
        return _Call(plan, _Dialect("completion", tokenizer), model_name, request_id, body.stream,
                     body.stream_options is not None and body.stream_options.include_usage)

    def chat_call(payload: dict, request_id: str) -> _Call:
        body = _parse_body(ChatBody, payload)
        _check_model(body.model, model_name)
        prompt = render_chat(parse_messages(body.messages), tokenizer)
        plan = _plan(body, [prompt], limits.completion_limit, request_id, limits, tokenizer)
        return _Call(plan, _Dialect("chat", tokenizer, body.top_logprobs or 0), model_name, request_id,
                     body.stream, body.stream_options is not None and body.stream_options.include_usage)

    async def serve(request: Request, make_call: Callable[[dict, str], _Call]) -> Response:
        request_id = _request_id(request)
        try:
            call = make_call(await _read_json(request, limits.max_body_bytes), request_id)
            return await call.respond(backend, request)
        except _ClientGone:
            logger.info("request %s: client disconnected", request_id)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        except Exception as error:
            return _error_response(_as_generation_error(error, request_id), request_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, completion_call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, chat_call)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "pdserve",
                "max_model_len": limits.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            status = await backend.health()
        except Exception as error:
            logger.warning("health check failed: %r", error)
            return JSONResponse({"status": "unavailable", "detail": "health check failed"}, status_code=503)
        body = {"status": "ok" if status.ready else "unavailable", "prefill_replicas": status.prefill_replicas,
                "decode_replicas": status.decode_replicas, "detail": status.detail}
        return JSONResponse(body, status_code=200 if status.ready else 503)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = {"error": {"message": str(error.detail), "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    return app


def _request_id(request: Request) -> str:
    """The client's `X-Request-Id` when it is a sane one (1-128 printable characters), else a new id."""
    given = request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFound(f"The model `{requested}` does not exist; this server serves `{served}`.")


async def _read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, refusing more than `max_bytes` whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise InvalidParameter("Invalid Content-Length header.")
    if declared is not None and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {max_bytes}.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"The request body exceeds the limit of {max_bytes} bytes.")
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidParameter("We could not parse the JSON body of your request. "
                               "The body must be a JSON object.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidParameter("The request body must be a JSON object.", code="invalid_json")
    return payload


def _error_response(error: GenerationError, request_id: str) -> JSONResponse:
    headers = {"X-Request-Id": request_id}
    seconds = retry_after_seconds(error)
    if seconds is not None:
        headers["Retry-After"] = str(seconds)
    return JSONResponse(openai_error_body(error), status_code=error.http_status, headers=headers)
