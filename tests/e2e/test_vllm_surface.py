"""What a vLLM user's requests get from a real server: vLLM's endpoints and fields beside OpenAI's."""
import json
from importlib.metadata import version

import httpx
import openai
import pytest

from server import Server

from pdserve.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.e2e
USER = [{"role": "user", "content": "Say hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server("--model", str(chat_model[0]), "--served-model-name", "tiny", "--colocated", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return load_tokenizer(chat_model[0])


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def greedy(server, prompt, max_tokens: int = 6, **fields) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **fields}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_tokenize_and_detokenize_speak_the_served_tokenizer(server, tokenizer):
    ids = tokenizer.encode("Hello world")
    reply = post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert reply == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                     "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    assert post(server, "/detokenize", {"tokens": ids, "model": "tiny"}).json() == {"prompt": "Hello world"}
    rendered = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert post(server, "/tokenize", {"messages": USER}).json()["tokens"] == list(rendered)
    assert error_of(post(server, "/detokenize", {"tokens": [10 ** 9]}), 400)["param"] == "tokens"
    assert error_of(post(server, "/tokenize", {"prompt": "hi", "model": "gpt-9"}), 404)["code"] == "model_not_found"


def test_version_and_ping(server):
    assert httpx.get(f"{server.url}/version").json() == {"version": version("pdserve")}
    for method in ("GET", "POST"):
        ping = httpx.request(method, f"{server.url}/ping", timeout=10)
        assert ping.status_code == 200 and ping.json()["status"] == "ok"


def test_any_64_bit_seed_is_served_and_wraps_as_unsigned(server):
    def sampled(seed: int, n: int = 1) -> list[str]:
        body = greedy(server, "Once upon", temperature=1.0, seed=seed, n=n)
        return [choice["text"] for choice in body["choices"]]

    assert sampled(-1) == sampled(2 ** 64 - 1)
    assert sampled(-(2 ** 63)) == sampled(2 ** 63)
    assert sampled(2 ** 64 - 1, n=2)[1] == sampled(0)[0]  # choice j is seeded seed + j


def test_echo_puts_each_prompt_before_its_completions(server, tokenizer):
    prompts = ["The sky is", "Grass is"]
    plain = greedy(server, prompts, n=2)["choices"]
    echoed = greedy(server, prompts, n=2, echo=True)["choices"]
    assert [c["text"] for c in echoed] == [prompts[c["index"] // 2] + c["text"] for c in plain]
    ids = tokenizer.encode("Water is")
    whole = greedy(server, ids, echo=True)["choices"][0]["text"]
    assert whole == tokenizer.decode(ids) + greedy(server, ids)["choices"][0]["text"]
    streamed = client(server).completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                                 stream=True, echo=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == whole
    # echo with logprobs lists the prompt's tokens first, the first (here the only one) with none
    one = tokenizer.encode("hi")
    scored = greedy(server, one, max_tokens=2, echo=True, logprobs=1)["choices"][0]["logprobs"]
    assert scored["tokens"][0] == tokenizer.decode(one) and scored["token_logprobs"][0] is None
    assert scored["top_logprobs"][0] is None and len(scored["tokens"]) == 3 and scored["text_offset"][:2] == [0, 2]


def test_chat_renders_as_vllm_template_fields_say(server, tokenizer):
    messages = [*USER, {"role": "assistant", "content": "Hello, my name"}]
    cases = [({"continue_final_message": True, "add_generation_prompt": False}, messages),
             ({"add_generation_prompt": False}, USER), ({"chat_template_kwargs": {"unused_variable": 1}}, USER)]
    for fields, conversation in cases:
        options = {k: v for k, v in fields.items() if k != "chat_template_kwargs"}
        ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                                 **{"add_generation_prompt": True, **options}))
        chat = client(server).chat.completions.create(
            model="tiny", messages=conversation, max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True, **fields})
        assert chat.usage.prompt_tokens == len(ids), fields
        assert chat.choices[0].message.content == greedy(server, ids)["choices"][0]["text"], fields
    both = {"messages": messages, "continue_final_message": True}  # add_generation_prompt defaults to true
    assert error_of(post(server, "/v1/chat/completions", both), 400)["param"] == "continue_final_message"
    reserved = {"messages": USER, "chat_template_kwargs": {"messages": []}}
    assert error_of(post(server, "/v1/chat/completions", reserved), 400)["param"] == "chat_template_kwargs"


def test_what_pdserve_does_not_serve_is_a_clear_400_and_the_neutral_forms_are_served(server):
    chat = client(server).chat.completions
    served = [dict(response_format={"type": "text"}), dict(tools=[TOOL], tool_choice="none"),
              dict(parallel_tool_calls=False, user="someone")]
    for fields in served:
        assert chat.create(model="tiny", messages=USER, max_tokens=2, **fields).choices[0].message.content
    refused = [(dict(response_format={"type": "json_object"}), "response_format"),
               (dict(tools=[TOOL]), "tool_choice"),  # tool_choice defaults to "auto" with tools, as in vLLM
               (dict(tools=[TOOL], tool_choice="required"), "tool_choice")]
    for fields, param in refused:
        with pytest.raises(openai.BadRequestError) as refusal:
            chat.create(model="tiny", messages=USER, max_tokens=2, **fields)
        assert refusal.value.body["param"] == param and refusal.value.body["message"]


def test_null_fields_read_as_absent(server):
    nulls = {"n": None, "stream": None, "stop": None, "seed": None, "temperature": None, "top_p": None,
             "logprobs": None, "user": None, "stream_options": None}
    chat = {"messages": USER, "max_tokens": 4, "ignore_eos": True}
    with_nulls = post(server, "/v1/chat/completions", {**chat, **nulls, "top_logprobs": None, "temperature": 0})
    assert with_nulls.status_code == 200, with_nulls.text
    plain = post(server, "/v1/chat/completions", {**chat, "temperature": 0}).json()
    assert with_nulls.json()["choices"] == plain["choices"]
    completion = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **nulls, "echo": None})
    assert completion.status_code == 200, completion.text
    assert error_of(post(server, "/v1/completions", {"prompt": None}), 400)["code"] == "missing_required_parameter"


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(server):
    options = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": USER, "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": options}) as reply:
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usages = [json.loads(event)["usage"] for event in events[:-1]]
    completion_tokens = [usage["completion_tokens"] for usage in usages]
    assert completion_tokens[0] == 0 and completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 5
    assert {usage["prompt_tokens"] for usage in usages} == {usages[-1]["total_tokens"] - 5}


def test_vllms_sampling_and_text_extras_are_served(server, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    plain = greedy(server, prompt, max_tokens=8)["choices"][0]["text"]
    # min_p 1: only the most likely token is left to sample, whatever the seed
    assert greedy(server, prompt, max_tokens=8, temperature=1.0, seed=7, min_p=1.0)["choices"][0]["text"] == plain
    stop = plain.strip().split()[1]
    kept = greedy(server, prompt, max_tokens=8, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    cut = greedy(server, prompt, max_tokens=8, stop=[stop])["choices"][0]
    assert kept["finish_reason"] == cut["finish_reason"] == "stop" and kept["text"] == cut["text"] + stop
    eos = tokenizer.eos_token_id  # a special token, forced by its bias
    forced = {"max_tokens": 2, "logit_bias": {str(eos): 100}}
    assert greedy(server, prompt, **forced)["choices"][0]["text"] == ""
    assert greedy(server, prompt, **forced, skip_special_tokens=False)["choices"][0]["text"] == tokenizer.decode([eos] * 2)
    truncated = greedy(server, prompt, truncate_prompt_tokens=3)
    assert truncated["usage"]["prompt_tokens"] == 3
    assert truncated["choices"][0]["text"] == greedy(server, prompt[-3:])["choices"][0]["text"]
    bare = greedy(server, "Hello", add_special_tokens=False)["usage"]["prompt_tokens"]
    assert bare == len(tokenizer.encode("Hello", add_special_tokens=False))


def test_unknown_fields_are_ignored_and_unserved_ones_refused(server):
    chat = client(server).chat.completions
    answer = chat.create(model="tiny", messages=USER, max_tokens=3, temperature=0, metadata={"team": "a"}, store=False,
                         service_tier="auto", extra_body={"ignore_eos": True, "some_future_field": 1, "priority": 0})
    assert answer.choices[0].message.content == chat.create(
        model="tiny", messages=USER, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    for extra, param in [({"guided_json": {"type": "object"}}, "guided_json"), ({"priority": 2}, "priority"),
                         ({"use_beam_search": True}, "use_beam_search"), ({"min_p": 2}, "min_p")]:
        with pytest.raises(openai.BadRequestError) as refusal:
            chat.create(model="tiny", messages=USER, max_tokens=2, extra_body=extra)
        assert refusal.value.body["param"] == param and refusal.value.body["message"]


def test_a_conversation_with_earlier_tool_calls_is_rendered_and_answered(server, tokenizer):
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    chat = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                                  extra_body={"ignore_eos": True})
    as_vllm_passes_them = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    ids = tokenizer.apply_chat_template(as_vllm_passes_them, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == greedy(server, list(ids), max_tokens=4)["choices"][0]["text"]
