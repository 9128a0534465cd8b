"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, and
vLLM's /tokenize, /detokenize, /version and /ping (the health check again, SageMaker's name for it).

A call's life: the body (capped by `BodySizeLimit` before it is read) → its
fields checked (`openai_schema`; every refusal is a 400/404/413 with an OpenAI
`{"error": ...}` body, FastAPI's 422 is never used) → the model name checked
against the served names → tokenize (chat: render the template) → a `Call`
(`openai_response`) that runs the choices and answers one JSON body or SSE.

pdserve extensions: `top_k`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`, `min_tokens`,
chat's `add_generation_prompt`, `continue_final_message` and `chat_template_kwargs` (as in vLLM),
and `usage.pdserve_timings`, the `PhaseTimings` of the choice that finished last.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from importlib.metadata import version
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.router.body_limit import BodySizeLimit
from pdserve.router.chat import parse_messages, render_chat
from pdserve.router.errors import InvalidParameter, openai_error_body, retry_after_seconds
from pdserve.router.generation import GenerationBackend, GenerationError
from pdserve.router.limits import RequestLimits
from pdserve.router.openai_response import Call, ClientGone, Dialect, as_generation_error, plan_requests
from pdserve.router.openai_schema import (
    ChatBody, CompletionBody, DetokenizeBody, TokenizeChatBody, TokenizePromptBody, parse_body,
)
from pdserve.router.served_models import ServedModels
from pdserve.router.text import check_token_ids, prompt_texts, prompt_token_ids

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the context left


def make_http_app(backend: GenerationBackend, tokenizer: Any, models: ServedModels, limits: RequestLimits) -> FastAPI:
    """The OpenAI-compatible FastAPI app serving `models` from `backend`."""
    app = FastAPI(title="pdserve", openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    started = int(time.time())

    def completion_call(payload: dict, request_id: str) -> Call:
        body = parse_body(CompletionBody, payload)
        models.check(body.model)
        prompts = prompt_token_ids(body.prompt, tokenizer, body.add_special_tokens)
        plan = plan_requests(body, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS, request_id, limits, tokenizer)
        echo = prompt_texts(body.prompt, prompts, tokenizer) if body.echo else []
        return Call(plan, Dialect("completion", tokenizer, body.num_top_logprobs()), models.primary, request_id, body.stream,
                    body.include_usage, tuple(text for text in echo for _ in range(body.n)), body.continuous_usage)

    def chat_call(payload: dict, request_id: str) -> Call:
        body = parse_body(ChatBody, payload)
        models.check(body.model)
        prompt = render_chat(parse_messages(body.messages), tokenizer, body.template_options())
        plan = plan_requests(body, [prompt], limits.completion_limit, request_id, limits, tokenizer)
        return Call(plan, Dialect("chat", tokenizer, body.num_top_logprobs()), models.primary, request_id,
                    body.stream, body.include_usage, continuous_usage=body.continuous_usage)

    async def serve(request: Request, make_call: Callable[[dict, str], Call]) -> Response:
        request_id = _request_id(request)
        try:
            call = make_call(await _read_json(request), request_id)
            return await call.respond(backend, request)
        except ClientGone:
            logger.info("request %s: client disconnected", request_id)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        except Exception as error:
            return _error_response(as_generation_error(error, request_id), request_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, completion_call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, chat_call)

    @app.get("/v1/models")
    async def list_models() -> dict:
        cards = [{"id": name, "object": "model", "created": started, "owned_by": "pdserve",
                  "max_model_len": limits.max_model_len} for name in models.names]
        return {"object": "list", "data": cards}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await answer(request, tokenize_body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await answer(request, detokenize_body)

    def tokenize_body(payload: dict) -> dict:
        """vLLM's /tokenize: a prompt's token ids, or a conversation's as chat completions render it."""
        body: TokenizeChatBody | TokenizePromptBody
        if "messages" in payload:
            body = parse_body(TokenizeChatBody, payload)
            models.check(body.model)
            ids = render_chat(parse_messages(body.messages), tokenizer, body.template_options())
        else:
            body = parse_body(TokenizePromptBody, payload)
            models.check(body.model)
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    def detokenize_body(payload: dict) -> dict:
        """vLLM's /detokenize: token ids as text, special tokens kept."""
        body = parse_body(DetokenizeBody, payload)
        models.check(body.model)
        check_token_ids(body.tokens, tokenizer, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    async def answer(request: Request, make_body: Callable[[dict], dict]) -> Response:
        """A JSON answer computed from the request's JSON body, or the error it raised."""
        request_id = _request_id(request)
        try:
            return JSONResponse(make_body(await _read_json(request)))
        except Exception as error:
            return _error_response(as_generation_error(error, request_id), request_id)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": version("pdserve")}

    @app.api_route("/ping", methods=["GET", "POST"])
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


async def _read_json(request: Request) -> dict:
    """The body as a JSON object (`BodySizeLimit` stops the read past the cap)."""
    body = bytearray()
    async for part in request.stream():
        body += part
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
