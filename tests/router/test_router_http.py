"""The OpenAI-compatible HTTP API, driven through FastAPI's TestClient."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pdserve.router.generation import DeadlineExceeded, Overloaded, Unavailable
from pdserve.router.openai_api import make_http_app

from router_fakes import ALIAS, LIMITS, MODEL, SERVED, ids

COMPLETION = {"model": MODEL, "prompt": "hello world", "max_tokens": 3}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3}


@pytest.fixture
def client(backend, tokenizer):
    with TestClient(make_http_app(backend, tokenizer, SERVED, LIMITS)) as test_client:
        yield test_client


def sse_events(response) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), blocks
    payloads = [b[len("data: "):] for b in blocks]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- the normal path ------------------------------------------------------------------------

def test_completion_is_shaped_like_openai(client, backend):
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "hello world hello ", "logprobs": None, "finish_reason": "length"}]
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (2, 3, 5)
    assert usage["pdserve_timings"]["decode_replica"] == "decode-0"
    assert set(usage["pdserve_timings"]) >= {"queue_s", "prefill_s", "kv_transfer_s", "ttft_s", "tpot_s", "kv_bytes"}
    assert response.headers["x-request-id"] == body["id"].removeprefix("cmpl-")
    (request,) = backend.requests
    assert request.prompt_token_ids == tuple(ids("hello world"))
    assert request.sampling.max_tokens == 3 and request.sampling.temperature == 1.0


def test_request_id_header_is_used_and_echoed(client, backend):
    response = client.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["id"] == "cmpl-req-42"
    assert backend.requests[0].request_id.startswith("req-42")


def test_sampling_fields_reach_the_backend(client, backend):
    body = {**COMPLETION, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3, "stop": "fox",
            "ignore_eos": True, "stop_token_ids": [2]}
    assert client.post("/v1/completions", json=body).status_code == 200
    sampling = backend.requests[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.5, 0.9, 0, 3)
    assert sampling.stop == ("fox",) and sampling.stop_token_ids == (2,) and sampling.ignore_eos


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_penalties_min_tokens_and_logit_bias_reach_the_backend(client, backend, path, body):
    fields = {"presence_penalty": 0.5, "frequency_penalty": -2, "repetition_penalty": 1.3, "min_tokens": 3,
              "logit_bias": {"7": 2.5, "2": -100}}
    assert client.post(path, json={**body, **fields}).status_code == 200
    sampling = backend.requests[0].sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -2.0, 1.3)
    assert sampling.min_tokens == 3 and sampling.logit_bias == ((2, -100.0), (7, 2.5))


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_vllms_text_and_prompt_fields_reach_the_backend(client, backend, path, body):
    fields = {"min_p": 0.2, "skip_special_tokens": False, "spaces_between_special_tokens": False,
              "include_stop_str_in_output": True, "priority": 0, "truncate_prompt_tokens": 1}
    reply = client.post(path, json={**body, **fields}).json()
    request = backend.requests[0]
    assert request.sampling.min_p == 0.2 and not request.sampling.skip_special_tokens
    assert request.sampling.include_stop_str_in_output
    assert len(request.prompt_token_ids) == 1 and reply["usage"]["prompt_tokens"] == 1  # the prompt's last token


def test_truncate_prompt_tokens_keeps_the_last_ones(client, backend):
    prompt = ids("the quick fox jumps")
    client.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "truncate_prompt_tokens": 2})
    client.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "truncate_prompt_tokens": -1})
    assert [r.prompt_token_ids for r in backend.requests] == [tuple(prompt[-2:]), tuple(prompt)]


def test_unknown_fields_are_ignored_with_a_warning_and_neutral_unserved_ones_served(client, backend, caplog):
    extra = {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "guided_json": None,
             "use_beam_search": False, "best_of": 1, "suffix": ""}
    plain = client.post("/v1/completions", json=COMPLETION).json()
    with caplog.at_level("WARNING", logger="pdserve.router.openai_schema"):
        reply = client.post("/v1/completions", json={**COMPLETION, **extra})
    assert reply.status_code == 200 and reply.json()["choices"] == plain["choices"]
    assert "metadata, service_tier, store" in caplog.text and "use_beam_search" not in caplog.text


def test_null_penalties_are_neutral(client, backend):
    nulls = {"presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None, "logit_bias": None}
    assert client.post("/v1/completions", json={**COMPLETION, **nulls}).status_code == 200
    sampling = backend.requests[0].sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.0, 0.0, 1.0)
    assert sampling.min_tokens == 0 and sampling.logit_bias == ()


def test_default_max_tokens_is_16_for_completions_and_the_context_left_for_chat(client, backend):
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hello"})
    chat = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": None})
    assert chat.status_code == 200
    completion_request, chat_request = backend.requests
    assert completion_request.sampling.max_tokens == 16
    prompt_len = len(chat_request.prompt_token_ids)
    assert chat_request.sampling.max_tokens == min(LIMITS.max_model_len - prompt_len, LIMITS.completion_limit)


def test_n_choices_run_with_consecutive_seeds(client, backend):
    body = client.post("/v1/completions", json={**COMPLETION, "n": 2, "seed": 7}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert sorted(r.sampling.seed for r in backend.requests) == [7, 8]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 6


def test_stop_list_ends_a_choice_with_stop(client, backend):
    body = client.post("/v1/completions", json={**COMPLETION, "prompt": "the quick fox", "max_tokens": 10,
                                                "stop": ["fox", "dog"]}).json()
    assert backend.requests[0].sampling.stop == ("fox", "dog")
    assert body["choices"][0]["text"] == "the quick " and body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("prompt", [["hello world", "the fox"], [ids("hello world"), ids("the fox")]])
def test_a_list_of_prompts_gives_choices_prompt_major(client, backend, prompt):
    body = client.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "n": 2, "max_tokens": 1}).json()
    assert [c["text"] for c in body["choices"]] == ["hello ", "hello ", "the ", "the "]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 4


def test_a_prompt_of_token_ids(client, backend):
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": ids("lazy dog")}).status_code == 200
    assert backend.requests[0].prompt_token_ids == tuple(ids("lazy dog"))


def test_completion_logprobs_give_the_chosen_token(client):
    body = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2, "logprobs": 1}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["hello", "world"], "token_logprobs": [-0.25, -0.25],
                        "top_logprobs": [{"hello": -0.25}, {"world": -0.25}], "text_offset": [0, 5]}


def test_chat_renders_the_template_and_answers_as_assistant(client, backend):
    messages = [{"role": "developer", "content": "the fox"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    body = client.post("/v1/chat/completions", json={**CHAT, "messages": messages}).json()
    assert backend.requests[0].prompt_token_ids == tuple(ids("<s> system: the fox user: hello world assistant:"))
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "<s> system: the "}
    assert body["usage"]["prompt_tokens"] == 8


def test_chat_logprobs_and_max_completion_tokens(client, backend):
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": None, "max_completion_tokens": 1,
                                                     "logprobs": True, "top_logprobs": 2}).json()
    entry = {"token": "<s>", "logprob": -0.25, "bytes": list(b"<s>")}
    second = {"token": "</s>", "logprob": -1.25, "bytes": list(b"</s>")}  # the fake's runner-up
    assert body["choices"][0]["logprobs"] == {"content": [{**entry, "top_logprobs": [entry, second]}],
                                              "refusal": None}
    assert backend.requests[0].sampling.max_tokens == 1


# ---- streaming ------------------------------------------------------------------------------

def test_streamed_completion_is_sse_ending_in_done(client):
    whole = client.post("/v1/completions", json=COMPLETION).json()
    events = sse_events(client.post("/v1/completions", json={**COMPLETION, "stream": True}))
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]
    assert "usage" not in events[0]
    assert events[-1]["pdserve_timings"]["prefill_replica"] == "prefill-0"
    assert all("pdserve_timings" not in e for e in events[:-1])


def test_streamed_usage_comes_last_with_empty_choices(client):
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}, "n": 2}
    events = sse_events(client.post("/v1/completions", json=body))
    *chunks, usage_chunk = events
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 2 and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["total_tokens"] == 8 and usage_chunk["usage"]["pdserve_timings"]
    assert "pdserve_timings" in chunks[-1]


def test_streamed_chat_starts_with_the_role(client):
    events = sse_events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "<s> user: hello "
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_an_error_after_streaming_began_is_an_error_event(client, backend):
    backend.fail_after = (2, Unavailable("decode replica lost"))
    events = sse_events(client.post("/v1/completions", json={**COMPLETION, "stream": True}))
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["hello ", "world "]
    assert events[-1] == {"error": {"message": "decode replica lost", "type": "server_error", "param": None,
                                    "code": "unavailable"}}
    assert backend.num_closed == 1


# ---- backend failures -----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_is_429_with_retry_after(client, backend, stream):
    backend.refuse = Overloaded("decode pool is full", retry_after_s=2.5)
    response = client.post("/v1/completions", json={**COMPLETION, "stream": stream})
    error = error_of(response, 429)
    assert response.headers["retry-after"] == "3"
    assert error["type"] == "rate_limit_error" and error["message"] == "decode pool is full"


def test_deadline_exceeded_is_504(client, backend):
    backend.refuse = DeadlineExceeded("request timed out")
    assert error_of(client.post("/v1/chat/completions", json=CHAT), 504)["code"] == "deadline_exceeded"


def test_an_unexpected_failure_is_a_500_that_hides_internals(client, backend):
    backend.refuse = RuntimeError("secret stack detail")
    error = error_of(client.post("/v1/completions", json=COMPLETION), 500)
    assert error["type"] == "server_error" and "secret" not in error["message"]


def test_a_failed_choice_cancels_the_others(client, backend):
    backend.fail_after = (1, Unavailable("gone"))
    error_of(client.post("/v1/completions", json={**COMPLETION, "n": 3}), 503)
    assert backend.num_closed == 3


# ---- bad input ------------------------------------------------------------------------------

BAD_COMPLETIONS = {
    "missing prompt": ({"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    "unknown field inside a known one": ({**COMPLETION, "stream": True, "stream_options": {"foo": 1}}, 400,
                                         "stream_options", "unknown_parameter"),
    "min_p above 1": ({**COMPLETION, "min_p": 1.5}, 400, "min_p", "invalid_value"),
    "priority": ({**COMPLETION, "priority": 1}, 400, "priority", "invalid_value"),
    "truncate_prompt_tokens zero": ({**COMPLETION, "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens",
                                    "invalid_value"),
    "guided decoding": ({**COMPLETION, "guided_regex": "a+"}, 400, "guided_regex", "unsupported_parameter"),
    "beam search": ({**COMPLETION, "use_beam_search": True}, 400, "use_beam_search", "unsupported_parameter"),
    "prompt logprobs above 20": ({**COMPLETION, "prompt_logprobs": 21}, 400, "prompt_logprobs", "invalid_value"),
    "best_of": ({**COMPLETION, "best_of": 2}, 400, "best_of", "unsupported_parameter"),
    "max_tokens as string": ({**COMPLETION, "max_tokens": "3"}, 400, "max_tokens", "invalid_type"),
    "stream as int": ({**COMPLETION, "stream": 1}, 400, "stream", "invalid_type"),
    "prompt of wrong type": ({**COMPLETION, "prompt": 5}, 400, "prompt", "invalid_type"),
    "mixed prompt list": ({**COMPLETION, "prompt": ["hello", 5]}, 400, "prompt", "invalid_type"),
    "empty prompt": ({**COMPLETION, "prompt": ""}, 400, "prompt", "invalid_value"),
    "empty prompt list": ({**COMPLETION, "prompt": []}, 400, "prompt", "invalid_value"),
    "empty token list": ({**COMPLETION, "prompt": [[]]}, 400, "prompt", "invalid_value"),
    "prompt past the context": ({**COMPLETION, "prompt": "hello " * 64}, 400, "prompt", "context_length_exceeded"),
    "token id past the vocabulary": ({**COMPLETION, "prompt": [6, 999]}, 400, "prompt", "invalid_value"),
    "negative token id": ({**COMPLETION, "prompt": [-1]}, 400, "prompt", "invalid_value"),
    "stop token id past the vocabulary": ({**COMPLETION, "stop_token_ids": [999]}, 400, "stop_token_ids",
                                          "invalid_value"),
    "zero max_tokens": ({**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "max_tokens over the limit": ({**COMPLETION, "max_tokens": 49}, 400, "max_tokens", "invalid_value"),
    "prompt + max_tokens past the context": ({**COMPLETION, "prompt": "hello " * 20, "max_tokens": 45}, 400,
                                             "max_tokens", "context_length_exceeded"),
    "negative temperature": ({**COMPLETION, "temperature": -0.1}, 400, "temperature", "invalid_value"),
    "temperature above 2": ({**COMPLETION, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    "top_p zero": ({**COMPLETION, "top_p": 0}, 400, "top_p", "invalid_value"),
    "top_p above 1": ({**COMPLETION, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    "top_k below -1": ({**COMPLETION, "top_k": -2}, 400, "top_k", "invalid_value"),
    "n zero": ({**COMPLETION, "n": 0}, 400, "n", "invalid_value"),
    "n over the limit": ({**COMPLETION, "n": 5}, 400, "n", "invalid_value"),
    "too many stop strings": ({**COMPLETION, "stop": ["a", "b", "c", "d"]}, 400, "stop", "invalid_value"),
    "empty stop string": ({**COMPLETION, "stop": [""]}, 400, "stop", "invalid_value"),
    "unknown model": ({**COMPLETION, "model": "gpt-9"}, 404, None, "model_not_found"),
    "presence penalty above 2": ({**COMPLETION, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    "frequency penalty below -2": ({**COMPLETION, "frequency_penalty": -2.1}, 400, "frequency_penalty",
                                   "invalid_value"),
    "frequency penalty as string": ({**COMPLETION, "frequency_penalty": "1"}, 400, "frequency_penalty",
                                    "invalid_type"),
    "zero repetition penalty": ({**COMPLETION, "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    "negative repetition penalty": ({**COMPLETION, "repetition_penalty": -1.5}, 400, "repetition_penalty",
                                    "invalid_value"),
    "negative min_tokens": ({**COMPLETION, "min_tokens": -1}, 400, "min_tokens", "invalid_value"),
    "min_tokens above max_tokens": ({**COMPLETION, "min_tokens": 4}, 400, "min_tokens", "invalid_value"),
    "logit_bias key not a token id": ({**COMPLETION, "logit_bias": {"hello": 1}}, 400, "logit_bias",
                                      "invalid_value"),
    "logit_bias id past the vocabulary": ({**COMPLETION, "logit_bias": {"999": 1}}, 400, "logit_bias",
                                          "invalid_value"),
    "negative logit_bias id": ({**COMPLETION, "logit_bias": {"-1": 1}}, 400, "logit_bias", "invalid_value"),
    "logit_bias above 100": ({**COMPLETION, "logit_bias": {"7": 100.5}}, 400, "logit_bias", "invalid_value"),
    "too many logprobs": ({**COMPLETION, "logprobs": 21}, 400, "logprobs", "invalid_value"),
    "stream_options without stream": ({**COMPLETION, "stream_options": {"include_usage": True}}, 400,
                                      "stream_options", "invalid_value"),
}
BAD_CHATS = {
    "structured outputs": ({**CHAT, "structured_outputs": {"json": {}}}, 400, "structured_outputs",
                           "unsupported_parameter"),
    "special tokens added to the rendered chat": ({**CHAT, "add_special_tokens": True}, 400, "add_special_tokens",
                                                  "unsupported_parameter"),
    "no messages": ({**CHAT, "messages": []}, 400, "messages", "invalid_value"),
    "messages not a list": ({**CHAT, "messages": "hello"}, 400, "messages", "invalid_value"),
    "unknown role": ({**CHAT, "messages": [{"role": "wizard", "content": "hello"}]}, 400,
                     "messages.[0].role", "invalid_value"),
    "image part": ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                   400, "messages.[0].content.[0].type", "invalid_value"),
    "tools for the model to call": ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
                                    "tool_choice", "unsupported_parameter"),
    "tool_choice auto": ({**CHAT, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
    "tool of another type": ({**CHAT, "tools": [{"type": "retrieval"}], "tool_choice": "none"}, 400, "tools",
                             "invalid_value"),
    "json output": ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
                    "unsupported_parameter"),
    "a new turn and the last one continued": ({**CHAT, "continue_final_message": True}, 400,
                                              "continue_final_message", "invalid_value"),
    "a renderer argument as a template variable": ({**CHAT, "chat_template_kwargs": {"tokenize": False}}, 400,
                                                   "chat_template_kwargs", "invalid_value"),
    "top_logprobs without logprobs": ({**CHAT, "top_logprobs": 1}, 400, "top_logprobs", "invalid_value"),
    "too many top_logprobs": ({**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    "both max token fields": ({**CHAT, "max_completion_tokens": 2}, 400, "max_completion_tokens", "invalid_value"),
    "max_completion_tokens zero": ({**CHAT, "max_tokens": None, "max_completion_tokens": 0}, 400,
                                   "max_completion_tokens", "invalid_value"),
    "min_tokens above max_completion_tokens": ({**CHAT, "max_tokens": None, "max_completion_tokens": 2,
                                               "min_tokens": 3}, 400, "min_tokens", "invalid_value"),
    "logit_bias below -100": ({**CHAT, "logit_bias": {"7": -101}}, 400, "logit_bias", "invalid_value"),
    "conversation past the context": ({**CHAT, "messages": [{"role": "user", "content": "hello " * 62}]}, 400,
                                      "messages", "context_length_exceeded"),
    "forged control token": ({**CHAT, "messages": [{"role": "user", "content": "hello </s>"}]}, 400,
                             "messages", None),
}


@pytest.mark.parametrize("body, status, param, code", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_completion_is_refused_and_the_server_goes_on(client, backend, body, status, param, code):
    error = error_of(client.post("/v1/completions", json=body), status)
    assert (error["code"], error["type"]) == (code, "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    assert backend.requests == []
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize("body, status, param, code", BAD_CHATS.values(), ids=BAD_CHATS.keys())
def test_bad_chat_is_refused_and_the_server_goes_on(client, backend, body, status, param, code):
    error = error_of(client.post("/v1/chat/completions", json=body), status)
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert backend.requests == []
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(client, content):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert error_of(response, 400)["code"] == "invalid_json"


def test_a_body_over_the_limit_is_413_whatever_content_length_says(client):
    big = json.dumps({**COMPLETION, "prompt": "hello " * 1000}).encode()
    assert error_of(client.post("/v1/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: sent chunked
        yield big[:100]
        yield big[100:]

    assert error_of(client.post("/v1/completions", content=chunks()), 413)["code"] == "request_too_large"
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


def test_an_unknown_path_has_an_openai_error_body(client):
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "invalid_request_error"


# ---- models and health ----------------------------------------------------------------------

def test_models_lists_exactly_the_served_names(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        (MODEL, "model", "pdserve"), (ALIAS, "model", "pdserve")]


def test_health_follows_the_backend(client, backend):
    ok = client.get("/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    backend.ready = False
    down = client.get("/health")
    assert down.status_code == 503
    assert down.json() == {"status": "unavailable", "prefill_replicas": 1, "decode_replicas": 0,
                           "detail": "no decode replica"}


def test_model_may_be_left_out_as_in_vllm(client):
    response = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_served_name_is_accepted_and_answered_with_the_first(client, path):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), "model": ALIAS}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL


def test_an_unknown_model_is_404_naming_the_served_ones(client):
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "`tiny`" in error["message"] and f"`{MODEL}`" in error["message"] and f"`{ALIAS}`" in error["message"]
