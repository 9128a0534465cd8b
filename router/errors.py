"""The router's own refusals, and the one mapping of every failure to HTTP and gRPC.

Validation at the edge raises the `GenerationError` subclasses below (or those of
`generation.py`); each front end turns them into its status here, once:

    error              HTTP  OpenAI type            code                  gRPC
    InvalidParameter   400   invalid_request_error  (per check)           INVALID_ARGUMENT
    InvalidRequest     400   invalid_request_error  -                     INVALID_ARGUMENT
    ModelNotFound      404   invalid_request_error  model_not_found       NOT_FOUND
    PayloadTooLarge    413   invalid_request_error  request_too_large     INVALID_ARGUMENT
    Unauthenticated    401   invalid_request_error  invalid_api_key       UNAUTHENTICATED
    Overloaded         429   rate_limit_error       rate_limit_exceeded   RESOURCE_EXHAUSTED
    Unavailable        503   server_error           unavailable           UNAVAILABLE
    DeadlineExceeded   504   server_error           deadline_exceeded     DEADLINE_EXCEEDED
    anything else      500   server_error           internal_error        INTERNAL
"""
from __future__ import annotations

import math

import grpc

from pdserve.router.generation import GenerationError, InvalidRequest

_OPENAI_TYPE_AND_CODE = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "deadline_exceeded"),
}


class InvalidParameter(InvalidRequest):
    """A request field the router refuses; `param` names it, `code` says why."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(GenerationError):
    param = "model"
    http_status = 404
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(GenerationError):
    http_status = 413
    grpc_code = "INVALID_ARGUMENT"


class Unauthenticated(GenerationError):
    """No API key, or the wrong one."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class InternalError(GenerationError):
    """Stands in for an unexpected exception, so users see no internals."""


def openai_error_body(error: GenerationError) -> dict:
    """The OpenAI-shaped `{"error": {...}}` body of a failure."""
    status = error.http_status
    kind, code = _OPENAI_TYPE_AND_CODE.get(
        status, ("invalid_request_error", None) if status < 500 else ("server_error", "internal_error")
    )
    param = getattr(error, "param", None)
    code = getattr(error, "code", None) or code
    return {"error": {"message": error.message, "type": kind, "param": param, "code": code}}


def retry_after_seconds(error: GenerationError) -> int | None:
    """Whole seconds for a `Retry-After` header: 429s always get one (1 s at least)."""
    if error.http_status != 429 and error.retry_after_s is None:
        return None
    return max(1, math.ceil(error.retry_after_s or 1))


def grpc_status(error: GenerationError) -> grpc.StatusCode:
    """The gRPC status code of a failure."""
    return grpc.StatusCode[error.grpc_code]


def grpc_details(error: GenerationError) -> str:
    """The status details of a failure, with the retry hint gRPC has no header for."""
    seconds = retry_after_seconds(error)
    return error.message if seconds is None else f"{error.message} (retry after {seconds} s)"
