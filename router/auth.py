"""API keys: `Authorization: Bearer KEY` over HTTP, the same in gRPC metadata.

Keys are compared in constant time. `/health` and `/ping` (vLLM's name for it)
stay open so that probes work without the key.
"""
from __future__ import annotations

import hmac
from typing import Any, Iterable

from .asgi import App, Receive, Scope, Send, send_error
from .errors import Unauthenticated

OPEN_PATHS = frozenset({"/health", "/ping", "/-/healthz", "/v1/pdserve/app"})  # the last: routers ask it of their port


class ApiKey:
    def __init__(self, key: str):
        if not key:
            raise ValueError("an API key must not be empty")
        self._key = key.encode()

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is 'Bearer <the key>'."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise Unauthenticated("Incorrect or missing API key: send 'Authorization: Bearer <key>'.")

    def check_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        """The gRPC form: the `authorization` metadata entry."""
        values = [v for k, v in metadata if k.lower() == "authorization"]
        self.check(values[0] if values else None)


class ApiKeyMiddleware:
    """Refuse HTTP requests without the key with 401 and an OpenAI-style error (pure ASGI)."""

    def __init__(self, app: App, api_key: ApiKey):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
            try:
                self.api_key.check(given[0].decode("latin-1") if given else None)
            except Unauthenticated as refusal:
                await send_error(send, refusal, headers=((b"www-authenticate", b"Bearer"),))
                return
        await self.app(scope, receive, send)
