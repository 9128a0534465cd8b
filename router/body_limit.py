"""A cap on request bodies, as pure ASGI middleware (any ASGI server, any route).

A body declared larger than the cap (`Content-Length`) is refused with 413
before a byte of it is read. A body that gives no length (chunked) or lies
about it is counted as the app reads it: the read that passes the cap raises
`PayloadTooLarge`, which the app answers as any other refusal, or this
middleware does when the app lets it through; the app reads nothing more.

The refusal never asks for the connection to close, and never reads on: the
client is usually still sending, and closing the socket under unread data makes
the kernel answer with a reset that can destroy the 413 before the client reads
it, while reading on would wake a client waiting on `Expect: 100-continue`. An
ASGI server drops the rest of a body the app did not read and keeps the
connection (uvicorn does).
"""
from __future__ import annotations

from pdserve.router.asgi import App, Message, Receive, Scope, Send, send_error
from pdserve.router.errors import InvalidParameter, PayloadTooLarge


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with an OpenAI-style 413."""

    def __init__(self, app: App, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _declared_length(scope)
        except InvalidParameter as refusal:
            await send_error(send, refusal)
            return
        if declared is not None and declared > self.max_bytes:
            await send_error(send, PayloadTooLarge(
                f"The request body is {declared} bytes; the limit is {self.max_bytes}."))
            return
        body = _CountingReceive(receive, self.max_bytes)
        response = _ResponseWatch(send)
        try:
            await self.app(scope, body, response)
        except PayloadTooLarge as refusal:
            if response.started:
                raise
            await send_error(send, refusal)


class _CountingReceive:
    """The app's `receive`: counts body bytes, raising `PayloadTooLarge` on the read past the cap."""

    def __init__(self, receive: Receive, max_bytes: int):
        self._receive = receive
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.refused = False

    async def __call__(self) -> Message:
        if self.refused:  # an app that reads on after the refusal gets an end, not more of the body
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            if self.num_bytes > self.max_bytes:
                self.refused = True
                raise PayloadTooLarge(f"The request body exceeds the limit of {self.max_bytes} bytes.")
        return message


class _ResponseWatch:
    """The app's `send`, noting whether the response has begun."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None when it has none."""
    values = {v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"}
    if not values:
        return None
    declared = values.pop()
    if values or not declared.isdigit():
        raise InvalidParameter("Invalid Content-Length header.")
    return int(declared)
