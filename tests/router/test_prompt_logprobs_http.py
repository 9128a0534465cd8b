"""Prompt logprobs over HTTP, spelled as vLLM does: completions' `echo` with `logprobs` covers the prompt's
tokens then the completion's (the first prompt token's null), `prompt_logprobs` in the completions choice
and the chat response (null first, then {token id: {logprob, rank, decoded_token}})."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pdserve.router.openai_api import make_http_app

from router_fakes import LIMITS, MODEL, SERVED, ids

PROMPT = "hello world fox"
ECHO = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1}


@pytest.fixture
def client(backend, tokenizer):
    with TestClient(make_http_app(backend, tokenizer, SERVED, LIMITS)) as test_client:
        yield test_client


def word(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client, backend, tokenizer):
    response = client.post("/v1/completions", json=ECHO)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    prompt = ids(PROMPT)
    assert backend.requests[0].sampling.prompt_logprobs == 1
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [word(tokenizer, t) for t in prompt + prompt[:1]]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -0.25]
    assert logprobs["top_logprobs"][0] is None
    # the prompt token, then the most likely one (which the fake puts one id above it)
    assert logprobs["top_logprobs"][1] == {word(tokenizer, prompt[1]): -1.0, word(tokenizer, prompt[1] + 1): -0.5}
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(logprobs["tokens"][i]) for i, (a, b) in enumerate(zip(offsets, offsets[1:])))
    assert choice["prompt_logprobs"] == [None] + [
        {str(t): {"logprob": -1.0, "rank": 2, "decoded_token": word(tokenizer, t)},
         str(t + 1): {"logprob": -0.5, "rank": 1, "decoded_token": word(tokenizer, t + 1)}} for t in prompt[1:]]


def test_a_stream_sends_the_prompt_logprobs_with_its_first_chunk(client):
    response = client.post("/v1/completions", json={**ECHO, "stream": True, "max_tokens": 2})
    blocks = [b[len("data: "):] for b in response.text.split("\n\n") if b]
    chunks = [json.loads(b)["choices"][0] for b in blocks[:-1]]
    first, second = chunks[0], chunks[1]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["token_logprobs"] == [None, -1.0, -1.0, -0.25]
    assert len(first["prompt_logprobs"]) == 3 and "prompt_logprobs" not in second
    assert second["logprobs"]["text_offset"] == [len(first["text"])]


def test_prompt_logprobs_alone_and_on_chat(client):
    completion = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1,
                                                      "prompt_logprobs": 0}).json()["choices"][0]
    assert completion["logprobs"] is None and completion["text"] == "hello "
    assert completion["prompt_logprobs"][0] is None and all(len(p) == 1 for p in completion["prompt_logprobs"][1:])
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                                                     "max_tokens": 1, "prompt_logprobs": 2}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(p) == 3 for p in chat["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT}).json()["choices"][0]
