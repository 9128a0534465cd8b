"""One accepted OpenAI API call: its backend requests, running them, and the response's spelling.

A call's life: `plan_requests` checks the sampling fields and fans the prompts
out into one `GenerationRequest` per choice, prompt-major → `Call.respond` runs
them concurrently on the backend (`merged`) → one JSON body, or SSE chunks
ending in `data: [DONE]`. Completions and chat differ only in their `Dialect`.

When streaming, the `PhaseTimings` of the choice that finished last ride as a
top-level `pdserve_timings` key on the last content chunk (the one whose
`finish_reason` ends the request), and inside `usage` of the usage chunk when
`stream_options.include_usage` is set; no extra empty-choices chunk is sent
unless usage is asked for. With vLLM's `continuous_usage_stats` too, every
chunk carries the call's usage so far (else `usage: null` until the last).

A failure before the first token raises (the app answers with its status);
after streaming began it becomes `data: {"error": {...}}` then `data: [DONE]`.
A client that disconnects cancels its backend generators at once. With `echo`
(completions), each choice's text begins with its prompt's: the whole text, or
the choice's first chunk; with `logprobs` too, so do its logprobs (the prompt's
first token with null ones), as vLLM spells them. Asked for `prompt_logprobs`,
a completions choice (its first chunk, streaming) and a chat response carry vLLM's
`prompt_logprobs`: null for the first prompt token, then {token id: {logprob, rank,
decoded_token}} of the prompt token and its most likely alternatives.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.messages import PromptLogprob, TopLogprobs
from pdserve.router.errors import InternalError, openai_error_body
from pdserve.router.generation import (
    GenerationBackend, GenerationChunk, GenerationError, GenerationRequest, PhaseTimings, SamplingOptions,
)
from pdserve.router.limits import RequestLimits, check_logit_bias, check_min_tokens, check_penalties, check_sampling
from pdserve.router.openai_schema import RequestBody
from pdserve.router.sse import DONE, EventStream, sse_data
from pdserve.router.text import check_token_ids, token_text

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ---- from a body to backend requests ---------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """The backend requests of one call, prompt-major: choice i is request i."""

    requests: list[GenerationRequest]
    prompt_tokens: int  # each prompt counted once, whatever n is
    logprobs: bool
    prompt_logprobs: bool = False


def plan_requests(body: RequestBody, prompts: list[list[int]], default_max_tokens: int, request_id: str,
                  limits: RequestLimits, tokenizer: Any) -> Plan:
    """Check the sampling fields against the limits and fan the prompts out into n requests each."""
    limits.check_n(body.n)
    check_sampling(body.temperature, body.top_p, body.top_k, body.min_p)
    stop = body.stop_strings()
    limits.check_stop(stop)
    stop_token_ids = tuple(body.stop_token_ids or ())
    check_token_ids(list(stop_token_ids), tokenizer, "stop_token_ids")
    requested_max, max_param = body.requested_max_tokens()
    penalties = _penalties(body, requested_max, max_param, tokenizer)
    logprobs = body.wants_logprobs()
    deadline = limits.deadline()
    requests = []
    prompts = [_truncated(ids, body.truncate_prompt_tokens, limits) for ids in prompts]
    for ids in prompts:
        limits.check_prompt_length(len(ids), body.prompt_field)
        max_tokens = limits.resolve_max_tokens(requested_max, len(ids), default_max_tokens, max_param)
        for j in range(body.n):
            sampling = SamplingOptions(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                seed=_choice_seed(body.seed, j), stop=stop, stop_token_ids=stop_token_ids,
                ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=body.num_top_logprobs(), min_p=body.min_p,
                prompt_logprobs=body.num_prompt_logprobs(),
                skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output, **penalties,
            )
            choice_id = f"{request_id}-{len(requests)}"
            requests.append(GenerationRequest(choice_id, tuple(ids), sampling, deadline))
    return Plan(requests, sum(len(ids) for ids in prompts), logprobs, body.num_prompt_logprobs() is not None)


def _truncated(ids: list[int], keep: int | None, limits: RequestLimits) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: as many as a prompt may have)."""
    if keep is None:
        return ids
    return ids[-(limits.prompt_limit if keep == -1 else keep):]


def _penalties(body: RequestBody, max_tokens: int | None, max_param: str, tokenizer: Any) -> dict[str, Any]:
    """The penalties, min_tokens and logit_bias of `SamplingOptions`, checked (null: neutral)."""
    presence, frequency = body.presence_penalty or 0.0, body.frequency_penalty or 0.0
    repetition = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    check_penalties(presence, frequency, repetition, body.min_tokens)
    check_min_tokens(body.min_tokens, max_tokens, max_param)
    bias = body.logit_bias_by_id()
    check_token_ids(list(bias), tokenizer, "logit_bias")
    return dict(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
                min_tokens=body.min_tokens, logit_bias=check_logit_bias(bias))


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice `choice`'s seed as the unsigned 64 bits the workers take (a negative seed wraps, as in two's complement)."""
    return None if seed is None else (seed + choice) % 2**64


# ---- running the choices ---------------------------------------------------------------------

async def merged(backend: GenerationBackend,
                 requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Run every request at once and yield `(choice index, chunk)` as chunks arrive.

    The first failure ends the merge; closing it (or cancelling its consumer)
    closes every backend generator. One request (the usual case) is relayed as is:
    no task and no queue hop per chunk.
    """
    if len(requests) == 1:
        async with contextlib.aclosing(backend.generate(requests[0])) as stream:
            async for chunk in stream:
                yield 0, chunk
        return
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
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[PromptLogprob, ...] = ()
    finish_reason: str | None = None
    timings: PhaseTimings | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.num_chars += len(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs or ())
        self.top_logprobs.extend(chunk.top_logprobs or ())
        self.prompt_logprobs = chunk.prompt_logprobs or self.prompt_logprobs
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.timings = chunk.timings or self.timings


def _usage(plan: Plan, states: list[ChoiceState]) -> dict:
    """OpenAI usage (the router's own count of what it relayed) plus `pdserve_timings`."""
    completion = sum(len(s.token_ids) for s in states)
    return {
        "prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion, "pdserve_timings": _request_timings(states),
    }


def _request_timings(states: list[ChoiceState]) -> dict | None:
    """The timings of the choice that finished last (its e2e is the request's)."""
    timed = [s.timings for s in states if s.timings is not None]
    return asdict(max(timed, key=lambda t: t.e2e_s)) if timed else None


# ---- the two response dialects ---------------------------------------------------------------

@dataclass(frozen=True)
class Logprobs:
    """What a choice (or a chunk of it) reports: per token, its logprob and its top alternatives (None
    for an echoed prompt's first token)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[TopLogprobs | None]

    def after(self, prompt_ids: tuple[int, ...], prompt: tuple[PromptLogprob, ...]) -> "Logprobs":
        """These behind an echoed prompt's own."""
        return Logprobs([*prompt_ids, *self.token_ids], [None, *(p.logprob for p in prompt), *self.logprobs],
                        [None, *(p.top for p in prompt), *self.top_logprobs])


@dataclass(frozen=True)
class Dialect:
    """How one endpoint spells its bodies: completions and chat differ only here."""

    kind: Literal["completion", "chat"]
    tokenizer: Any
    top_logprobs: int = 0  # alternatives asked for per token (completions' `logprobs`, chat's `top_logprobs`)

    @property
    def id_prefix(self) -> str:
        return "cmpl-" if self.kind == "completion" else "chatcmpl-"

    def object(self, streaming: bool) -> str:
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if streaming else "chat.completion"

    def choice(self, index: int, text: str, logprobs: Logprobs | None, finish_reason: str | None,
               streaming: bool, text_offset: int = 0, prompt_logprobs: tuple[PromptLogprob, ...] | None = None) -> dict:
        """One entry of `choices`: whole (a response) or a delta (a stream chunk); a completions choice
        with `prompt_logprobs` (chat's are the response's)."""
        spelled = None if logprobs is None else self._logprobs(logprobs, text_offset)
        if self.kind == "completion":
            body = {"index": index, "text": text}
            if prompt_logprobs is not None:
                body["prompt_logprobs"] = self.prompt_logprobs(prompt_logprobs)
        elif streaming:
            body = {"index": index, "delta": {"content": text} if text else {}}
        else:
            body = {"index": index, "message": {"role": "assistant", "content": text}}
        return {**body, "logprobs": spelled, "finish_reason": finish_reason}

    def role_choice(self, index: int) -> dict:
        """The first chat stream chunk of a choice, naming the assistant's role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def prompt_logprobs(self, prompt: tuple[PromptLogprob, ...]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: none for the first token, then each token's and its alternatives'."""
        return [None, *({str(t): {"logprob": _clamped(lp), "rank": rank, "decoded_token": token_text(t, self.tokenizer)}
                         for t, lp, rank in _ranked(p)} for p in prompt)]

    def _logprobs(self, logprobs: Logprobs, text_offset: int) -> dict:
        tokens = [token_text(t, self.tokenizer) for t in logprobs.token_ids]
        steps = [None if lp is None else _step_logprobs(t, lp, top) for t, lp, top in
                 zip(logprobs.token_ids, logprobs.logprobs, logprobs.top_logprobs)]
        if self.kind == "completion":
            offsets = []
            for token in tokens:
                offsets.append(text_offset)
                text_offset += len(token)
            # vLLM's: the chosen token and the N most likely, keyed by their text
            top = [None if step is None else {token_text(t, self.tokenizer): _clamped(lp)
                                              for t, lp in step[:self.top_logprobs + 1]} for step in steps]
            return {"tokens": tokens, "token_logprobs": [None if lp is None else _clamped(lp) for lp in logprobs.logprobs],
                    "top_logprobs": top, "text_offset": offsets}
        content = []
        for token, lp, step in zip(tokens, logprobs.logprobs, steps):
            top = [_chat_entry(token_text(t, self.tokenizer), alt) for t, alt in step[:self.top_logprobs]]
            content.append({**_chat_entry(token, lp), "top_logprobs": top})
        return {"content": content, "refusal": None}


def _step_logprobs(token_id: int, logprob: float, top: TopLogprobs) -> list[tuple[int, float]]:
    """One step's logprobs as vLLM ranks them: the chosen token first, then the most likely ones (a token
    among both appears once, first). Completions show N + 1 of them and chat N: with greedy decoding that is
    the N most likely either way; a sampled token outside them comes first and pushes the last one out."""
    return list({token_id: logprob, **dict(top)}.items())


def _ranked(scored: PromptLogprob) -> list[tuple[int, float, int]]:
    """A prompt position's (token, logprob, rank) as vLLM lists them: the prompt token, then the most
    likely (a token among both appears once, first)."""
    ranked = {scored.token_id: (scored.logprob, scored.rank)}
    for rank, (token, logprob) in enumerate(scored.top, start=1):
        ranked.setdefault(token, (logprob, rank))
    return [(token, logprob, rank) for token, (logprob, rank) in ranked.items()]


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _clamped(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def _clamped(logprob: float) -> float:
    """-inf (a token the model rules out) as the finite number OpenAI and vLLM send."""
    return max(logprob, -9999.0)


# ---- the call --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One accepted API call, ready to run."""

    plan: Plan
    dialect: Dialect
    model: str
    request_id: str
    stream: bool
    include_usage: bool
    echo: tuple[str, ...] = ()  # with `echo`, each choice's prompt text; else empty
    continuous_usage: bool = False  # with `include_usage`: the usage so far on every chunk
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict], streaming: bool) -> dict:
        return {"id": self.dialect.id_prefix + self.request_id, "object": self.dialect.object(streaming),
                "created": self.created, "model": self.model, "choices": choices}

    async def respond(self, backend: GenerationBackend, request: Request) -> Response:
        """Run the call; until the response starts, a client that leaves cancels it (`ClientGone`)."""
        events = merged(backend, self.plan.requests)
        if not self.stream:
            body = await _unless_client_leaves(request, self._whole(events))
            return JSONResponse(body, headers={"X-Request-Id": self.request_id})
        try:  # the first event comes before the 200, so an early refusal keeps its status
            first = await _unless_client_leaves(request, anext(events, None))
        except BaseException:
            await events.aclose()
            raise
        return EventStream(self._sse(events, first), close=events.aclose,
                           headers={"X-Request-Id": self.request_id, "Cache-Control": "no-cache"})

    async def _whole(self, events: AsyncIterator[tuple[int, GenerationChunk]]) -> dict:
        states = [ChoiceState() for _ in self.plan.requests]
        async with contextlib.aclosing(events):
            async for index, chunk in events:
                states[index].add(chunk)
        choices = [
            self.dialect.choice(i, self._prompt_text(i) + "".join(s.text),
                                self._logprobs(i, Logprobs(s.token_ids, s.logprobs, s.top_logprobs), s.prompt_logprobs,
                                               first=True),
                                s.finish_reason, streaming=False, prompt_logprobs=self._prompt_logprobs(s.prompt_logprobs, True))
            for i, s in enumerate(states)
        ]
        body = {**self.envelope(choices, streaming=False), "usage": _usage(self.plan, states)}
        if self.dialect.kind == "chat" and self.plan.prompt_logprobs:  # one prompt: the response's
            body["prompt_logprobs"] = self.dialect.prompt_logprobs(states[0].prompt_logprobs)
        return body

    def _logprobs(self, index: int, logprobs: Logprobs, prompt: tuple[PromptLogprob, ...],
                  first: bool) -> Logprobs | None:
        """A choice's (or its chunk's) logprobs where asked, behind its prompt's with `echo` (in a stream, on
        the choice's `first` chunk; a one-token prompt scores nothing, yet its token is listed, null)."""
        if not self.plan.logprobs:
            return None
        return logprobs.after(self.plan.requests[index].prompt_token_ids, prompt) if self.echo and first else logprobs

    def _prompt_logprobs(self, prompt: tuple[PromptLogprob, ...], first: bool) -> tuple[PromptLogprob, ...] | None:
        """A completions choice's prompt logprobs where asked (in a stream, on the choice's `first` chunk)."""
        return prompt if self.plan.prompt_logprobs and first else None

    async def _sse(self, events: AsyncIterator[tuple[int, GenerationChunk]],
                   first: tuple[int, GenerationChunk] | None) -> AsyncIterator[str]:
        states = [ChoiceState() for _ in self.plan.requests]
        try:
            if self.dialect.kind == "chat":
                for i in range(len(states)):
                    role = self.envelope([self.dialect.role_choice(i)], True)
                    yield sse_data({**role, **self._usage_so_far(states)})
            async with contextlib.aclosing(events):
                pending = [first] if first is not None else []
                async for index, chunk in _prepend(pending, events):
                    yield sse_data(self._chunk_body(index, chunk, states))
            if self.include_usage:
                yield sse_data({**self.envelope([], True), "usage": _usage(self.plan, states)})
        except Exception as error:
            yield sse_data(openai_error_body(as_generation_error(error, self.request_id)))
        yield DONE

    def _usage_so_far(self, states: list[ChoiceState]) -> dict:
        """A content chunk's `usage` entry: none without `include_usage`, null unless continuous."""
        if not self.include_usage:
            return {}
        return {"usage": _usage(self.plan, states) if self.continuous_usage else None}

    def _chunk_body(self, index: int, chunk: GenerationChunk, states: list[ChoiceState]) -> dict:
        state = states[index]
        first = not state.text
        offset = 0 if first else state.num_chars + len(self._prompt_text(index))  # an echoed prompt's text first
        text = self._prompt_text(index) + chunk.text if first else chunk.text
        state.add(chunk)
        prompt = chunk.prompt_logprobs or ()
        logprobs = self._logprobs(index, Logprobs(list(chunk.token_ids), list(chunk.logprobs or ()),
                                                  list(chunk.top_logprobs or ())), prompt, first)
        choice = self.dialect.choice(index, text, logprobs, chunk.finish_reason, streaming=True,
                                     text_offset=offset,
                                     prompt_logprobs=self._prompt_logprobs(prompt, first))
        body = {**self.envelope([choice], True), **self._usage_so_far(states)}
        if chunk.finish_reason and all(s.finish_reason for s in states):
            body["pdserve_timings"] = _request_timings(states)
        return body

    def _prompt_text(self, index: int) -> str:
        """What choice `index`'s text begins with: its prompt's with `echo`, else nothing."""
        return self.echo[index] if self.echo else ""


class ClientGone(Exception):
    """The client disconnected before its response began."""


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and `ClientGone` raised."""
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
        raise ClientGone()
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


def as_generation_error(error: Exception, request_id: str) -> GenerationError:
    """A `GenerationError` as is; anything else logged and hidden behind a 500."""
    if isinstance(error, GenerationError):
        return error
    logger.exception("request %s failed", request_id, exc_info=error)
    return InternalError("The server had an error while processing your request.")
