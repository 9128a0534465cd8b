"""API keys: `Authorization: Bearer KEY` over HTTP, the same in gRPC metadata.

Keys are compared in constant time. `/health` stays open so that probes work
without the key.
"""
from __future__ import annotations

import hmac
from typing import Any, Iterable

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import Unauthenticated, openai_error_body

OPEN_PATHS = frozenset({"/health", "/-/healthz"})


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


class ApiKeyMiddleware(BaseHTTPMiddleware):
    """Refuse HTTP requests without the key with 401 and an OpenAI-style error."""

    def __init__(self, app: Any, api_key: ApiKey):
        super().__init__(app)
        self.api_key = api_key

    async def dispatch(self, request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            try:
                self.api_key.check(request.headers.get("authorization"))
            except Unauthenticated as e:
                return JSONResponse(openai_error_body(e), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)
