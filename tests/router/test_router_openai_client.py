"""The official `openai` client against a real uvicorn server; client disconnects cancel the backend."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from pdserve.router.openai_api import make_http_app

from router_fakes import ALIAS, EchoBackend, LIMITS, MODEL, SERVED


@pytest.fixture(scope="module")
def served(tokenizer):
    """A uvicorn server on a free port of 127.0.0.1, in a thread; yields (base_url, backend)."""
    backend = EchoBackend(tokenizer)
    server = uvicorn.Server(uvicorn.Config(make_http_app(backend, tokenizer, SERVED, LIMITS),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", backend
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def client(served):
    base_url, backend = served
    backend.hang_after = None
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=10)


def test_completions(client):
    completion = client.completions.create(model=MODEL, prompt="the quick fox", max_tokens=4, n=2, seed=1)
    assert [c.text for c in completion.choices] == ["the quick fox the "] * 2
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.total_tokens == 3 + 8
    assert completion.usage.model_extra["pdserve_timings"]["decode_replica"] == "decode-0"


def test_streamed_completions(client):
    stream = client.completions.create(model=MODEL, prompt="hello world", max_tokens=3, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello world hello "
    assert chunks[-1].usage.completion_tokens == 3


def test_chat(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_completion_tokens=2, logprobs=True)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "<s> user: "
    assert [t.logprob for t in chat.choices[0].logprobs.content] == [-0.25, -0.25]


def test_streamed_chat(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "<s> user: hello "
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["pdserve_timings"]["prefill_replica"] == "prefill-0"


def test_errors_reach_the_client_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hello")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3)


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL, ALIAS]


def test_an_oversized_body_is_413_and_the_connection_stays_usable(served):
    """Through a real socket: 64 MiB declared, then an endless chunked upload, then a normal call on it."""
    base_url, _ = served
    declared = json.dumps({"model": MODEL, "prompt": "x" * (64 << 20)}).encode()

    def chunked():  # gives no length: the server counts and stops reading past the limit
        yield b'{"prompt": "'
        for _ in range(1024):
            yield b"x" * 65536

    with httpx.Client(base_url=base_url, timeout=30) as http:
        for content in (declared, chunked()):
            response = http.post("/completions", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "request_too_large"
        ok = http.post("/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_a_disconnected_stream_cancels_the_backend(client, served):
    _, backend = served
    backend.hang_after = 1
    closed_before = backend.num_closed
    stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=9, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 5
    while backend.num_closed == closed_before:
        assert time.monotonic() < deadline, "the backend generator was not closed"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_any_token_is_sent_cancels_the_backend(backend, tokenizer, stream):
    """At the ASGI level: the client leaves while the backend is still waiting on its first token."""
    backend.hang_after = 0
    app = make_http_app(backend, tokenizer, SERVED, LIMITS)
    body = json.dumps({"model": MODEL, "prompt": "hello", "stream": stream, "n": 2}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def run() -> list:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            if incoming:
                return incoming.pop()
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), timeout=5)
        return sent

    sent = asyncio.run(run())
    assert backend.num_closed == 2
    assert sent[0]["status"] == 499
