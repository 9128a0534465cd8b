"""What the pure ASGI middleware of the HTTP app share: the ASGI types and an OpenAI-style refusal.

Pure ASGI (not Starlette's `BaseHTTPMiddleware`, which relays every streamed chunk
through a task and a memory stream of its own) keeps a token's way to the socket
one `send` call per layer.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from pdserve.router.errors import openai_error_body
from pdserve.router.generation import GenerationError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, error: GenerationError, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer with `error`'s status and OpenAI-style JSON body."""
    payload = json.dumps(openai_error_body(error), separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    await send({"type": "http.response.start", "status": error.http_status, "headers": head})
    await send({"type": "http.response.body", "body": payload})
