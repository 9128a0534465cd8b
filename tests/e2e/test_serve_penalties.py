"""vLLM's sampling fields through a real `pdserve serve`, colocated and 1 prefill + 1 decode, the decode loop
one step ahead as on a GPU: greedy tokens with `repetition_penalty` and `min_tokens` equal transformers'
`generate()` with `repetition_penalty` and `min_new_tokens` on the same weights, over gRPC and the openai
client; `logit_bias` works on chat; the top-N logprobs of every token (the first one a prefill's) equal
transformers' log-softmax topk; completions' `echo` with `logprobs` and `max_tokens` 1 (lm-eval's loglikelihood)
scores each prompt token as transformers' log-softmax does; bad values are refused with the APIs' errors."""
import json
import shutil

import grpc
import openai
import pytest
import torch

from server import Server
from tiny_models import reference_tokens

from pdserve.engine.tokenizer import load_tokenizer
from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

PROMPT = [1126, 3306, 28, 411, 2765, 8450, 18, 1126, 3306]
MAX_TOKENS, MIN_TOKENS, REPETITION = 16, 6, 1.3
TOP_N, TOP_STEPS = 5, 4


@pytest.fixture(scope="module")
def served_model(chat_model, tmp_path_factory):
    """(directory, expected tokens): the chat model with its EOS set to the token plain greedy takes first,
    and transformers' tokens with the penalty and min_new_tokens, which must hold that EOS back."""
    model = chat_model[1]
    eos = reference_tokens(model, PROMPT, 1)[0]
    directory = tmp_path_factory.mktemp("eos-model")
    shutil.copytree(chat_model[0], directory, dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if path.exists():
            path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": eos}))
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                         repetition_penalty=REPETITION, min_new_tokens=MIN_TOKENS, eos_token_id=eos)
    expected = out[0, len(PROMPT):].tolist()
    plain = reference_tokens(model, PROMPT, MAX_TOKENS)
    assert expected[0] != eos and len(expected) > MIN_TOKENS and expected != plain[:len(expected)]
    return directory, expected, eos


@pytest.fixture(scope="module")
def top_reference(chat_model) -> list[list[tuple[int, float]]]:
    """transformers' TOP_N most likely (token, logprob) at each of PROMPT's first TOP_STEPS greedy steps."""
    model = chat_model[1]
    tokens = reference_tokens(model, PROMPT, TOP_STEPS)
    steps = []
    with torch.no_grad():
        for i in range(TOP_STEPS):
            top = torch.log_softmax(model(torch.tensor([PROMPT + tokens[:i]])).logits[0, -1], -1).topk(TOP_N)
            steps.append(list(zip(top.indices.tolist(), top.values.tolist())))
    return steps


@pytest.fixture(scope="module")
def prompt_reference(chat_model) -> torch.Tensor:
    """transformers' log-softmax at each position of PROMPT, [len(PROMPT), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(chat_model[1](torch.tensor([PROMPT])).logits[0].float(), -1)


def assert_prompt_scored(choice, tokenizer, reference: torch.Tensor) -> None:
    """An echoed completion's logprobs: the prompt's tokens (the first with none) as transformers scores
    them, then the completion's one token; vLLM's prompt_logprobs the same, with ranks."""
    logprobs = choice.logprobs
    assert logprobs.tokens[:len(PROMPT)] == [tokenizer.decode([t]) for t in PROMPT] and len(logprobs.tokens) == len(PROMPT) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [reference[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert all(abs(a - b) < 1e-3 for a, b in zip(logprobs.token_logprobs[1:len(PROMPT)], expected)), logprobs.token_logprobs
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        entry = prompt_logprobs[i][str(PROMPT[i])]
        row = reference[i - 1]
        assert abs(entry["logprob"] - expected[i - 1]) < 1e-3
        assert entry["rank"] == int((row > row[PROMPT[i]]).sum()) + 1
        assert str(row.argmax().item()) in prompt_logprobs[i]  # the most likely alternative too


def overlapping(tmp_path) -> tuple[str, str]:
    path = tmp_path / "config.yaml"
    path.write_text("decode: {overlap_steps: true}\n")
    return "--config", str(path)


DEPLOYMENTS = {"colocated": ("--colocated", "1"), "1P+1D": ("--prefill-replicas", "1", "--decode-replicas", "1")}


@pytest.mark.parametrize("deployment", DEPLOYMENTS.values(), ids=DEPLOYMENTS.keys())
def test_penalties_min_tokens_and_top_logprobs_equal_transformers(served_model, top_reference, prompt_reference,
                                                                 tmp_path, deployment):
    directory, expected, eos = served_model
    server = Server("--model", str(directory), *deployment, *overlapping(tmp_path))
    try:
        grpc_tokens, grpc_text, grpc_reason = generate(server, pb.SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=REPETITION, min_tokens=MIN_TOKENS))
        http = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        completion = http.completions.create(model=str(directory), prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"repetition_penalty": REPETITION, "min_tokens": MIN_TOKENS})
        token = load_tokenizer(directory).encode(" Paris")[0]
        chat = http.chat.completions.create(model=str(directory), messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0, logit_bias={str(token): 100},
                                            extra_body={"ignore_eos": True})
        top_grpc, top_completion, top_chat = top_logprobs(server, directory)
        echoed = http.completions.create(model=str(directory), prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                         temperature=0)
        prompt_grpc = grpc_prompt_logprobs(server)
        bad = bad_values(server)
        decode = server.wait_all_blocks_free()
    finally:
        server.stop()
    assert grpc_tokens == expected
    assert grpc_reason == ("stop" if expected[-1] == eos else "length")
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason, completion.usage.completion_tokens) == (
        grpc_text, grpc_reason, len(expected))
    assert chat.choices[0].message.content == load_tokenizer(directory).decode([token] * 3)
    tokenizer = load_tokenizer(directory)
    for step, reference in enumerate(top_reference):
        assert [t for t, _ in top_grpc[step]] == [t for t, _ in reference], step
        assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(top_grpc[step], reference)), step
        spelled = {tokenizer.decode([t]): lp for t, lp in reference}  # greedy: the chosen token is the first
        assert top_completion[step].keys() == spelled.keys(), step
        assert all(abs(top_completion[step][k] - spelled[k]) < 1e-3 for k in spelled), step
    assert [len(entry) for entry in top_chat] == [3] * len(top_chat)
    assert_prompt_scored(echoed.choices[0], tokenizer, prompt_reference)
    assert [p.token_id for p in prompt_grpc] == PROMPT[1:]
    assert all(abs(p.logprob - prompt_reference[i, PROMPT[i + 1]].item()) < 1e-3 for i, p in enumerate(prompt_grpc))
    assert [list(p.top.token_ids) for p in prompt_grpc] == [[prompt_reference[i].argmax().item()] for i in range(len(PROMPT) - 1)]
    assert bad == [(400, "repetition_penalty"), (400, "min_tokens"), (400, "logit_bias"), (400, "logprobs"),
                   grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT]
    assert decode and all(r["overlap_steps"] and r["num_blocks_used"] == 0 for r in decode.values()), decode


def generate(server: Server, sampling: pb.SamplingParams) -> tuple[list[int], str, str]:
    """Token ids, text and finish reason of PROMPT over gRPC."""
    tokens, text, reason = [], "", ""
    with grpc.insecure_channel(server.grpc_address) as channel:
        for response in pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling), timeout=120):
            tokens += response.token_ids
            text += response.text
            reason = response.finish_reason or reason
    return tokens, text, reason


def top_logprobs(server: Server, directory) -> tuple[list, list[dict], list[list]]:
    """PROMPT's greedy top-TOP_N logprobs per token over gRPC (token ids) and completions (text keys), and
    a chat's top-3 entries per token."""
    tokens = []
    with grpc.insecure_channel(server.grpc_address) as channel:
        sampling = pb.SamplingParams(max_tokens=TOP_STEPS, temperature=0, ignore_eos=True, logprobs=1,
                                     top_logprobs=TOP_N)
        for response in pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling), timeout=120):
            tokens += [list(zip(top.token_ids, top.logprobs)) for top in response.top_logprobs]
    http = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    completion = http.completions.create(model=str(directory), prompt=PROMPT, max_tokens=TOP_STEPS, temperature=0,
                                         logprobs=TOP_N, extra_body={"ignore_eos": True})
    chat = http.chat.completions.create(model=str(directory), messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, temperature=0, logprobs=True, top_logprobs=3,
                                        extra_body={"ignore_eos": True})
    return tokens, completion.choices[0].logprobs.top_logprobs, [t.top_logprobs for t in chat.choices[0].logprobs.content]


def grpc_prompt_logprobs(server: Server) -> list:
    """PROMPT's prompt logprobs (with the most likely token at each position) over gRPC."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        messages = list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)),
            timeout=120))
    return list(messages[0].prompt_logprobs)


def bad_values(server: Server) -> list:
    """What the server answers to bad values: (status, param) over HTTP, the status code over gRPC."""
    http = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    answers = []
    for extra in ({"repetition_penalty": 0}, {"min_tokens": 9, "max_tokens": 4}, {"logit_bias": {"49152": 1}},
                  {"logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as refused:
            http.completions.create(model="", prompt=PROMPT, extra_body=extra)
        answers.append((refused.value.status_code, refused.value.body["param"]))
    for sampling in (pb.SamplingParams(max_tokens=2, min_tokens=3), pb.SamplingParams(logprobs=1, top_logprobs=21)):
        with pytest.raises(grpc.RpcError) as failed:
            generate(server, sampling)
        answers.append(failed.value.code())
    return answers
