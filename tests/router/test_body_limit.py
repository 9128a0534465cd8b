"""`BodySizeLimit` at the ASGI level, around an app that knows nothing of it."""
from __future__ import annotations

import asyncio
import json

import pytest

from pdserve.router.body_limit import BodySizeLimit

LIMIT = 100


async def echo_length(scope, receive, send) -> None:
    """Reads the whole body (as any app would, no cap of its own) and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def call(app, headers: list[tuple[bytes, bytes]], parts: list[bytes]) -> tuple[list[dict], int]:
    """Run one request through `app`: (messages sent, body parts read)."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    incoming = [{"type": "http.request", "body": p, "more_body": i + 1 < len(parts)} for i, p in enumerate(parts)]
    sent, num_read = [], 0

    async def receive():
        nonlocal num_read
        num_read += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=5))
    return sent, num_read


def status_and_error(sent: list[dict]) -> tuple[int, dict]:
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return sent[0]["status"], body["error"]


def test_a_declared_length_over_the_limit_is_refused_before_any_read():
    sent, num_read = call(BodySizeLimit(echo_length, LIMIT), [(b"content-length", b"101")], [b"x" * 101])
    status, error = status_and_error(sent)
    assert (status, error["code"], error["type"]) == (413, "request_too_large", "invalid_request_error")
    assert "101" in error["message"] and num_read == 0
    assert (b"connection", b"close") not in sent[0]["headers"]  # closing under an unread body resets the client


def test_a_chunked_body_is_cut_at_the_limit_and_refused():
    parts = [b"x" * 60] * 10  # no Content-Length
    sent, num_read = call(BodySizeLimit(echo_length, LIMIT), [], parts)
    assert status_and_error(sent)[0] == 413 and num_read == 2


def test_a_body_longer_than_it_declared_is_refused_too():
    sent, _ = call(BodySizeLimit(echo_length, LIMIT), [(b"content-length", b"10")], [b"x" * 60] * 3)
    assert status_and_error(sent)[0] == 413


def test_a_body_within_the_limit_reaches_the_app_whole():
    sent, _ = call(BodySizeLimit(echo_length, LIMIT), [(b"content-length", b"100")], [b"x" * 50, b"x" * 50])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"100"


@pytest.mark.parametrize("value", [b"ten", b"-1", b""])
def test_a_malformed_content_length_is_400(value):
    sent, num_read = call(BodySizeLimit(echo_length, LIMIT), [(b"content-length", value)], [b"{}"])
    assert status_and_error(sent)[0] == 400 and num_read == 0
