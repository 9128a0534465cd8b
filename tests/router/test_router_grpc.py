"""The gRPC front end, called as Ray Serve's proxy calls it: methods with a `grpc_context`."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.router.generation import DeadlineExceeded, GenerationError, Overloaded, Unavailable
from pdserve.router.grpc_api import GrpcFrontEnd

from router_fakes import ALIAS, LIMITS, MODEL, SERVED, ids


class FakeContext:
    """What a deployment method sees of `RayServegRPCContext`."""

    def __init__(self):
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def generate(front_end: GrpcFrontEnd, request: pb.GenerateRequest, context: FakeContext) -> list[pb.GenerateResponse]:
    async def collect():
        return [m async for m in front_end.Generate(request, grpc_context=context)]
    return asyncio.run(collect())


@pytest.fixture
def front_end(backend, tokenizer) -> GrpcFrontEnd:
    return GrpcFrontEnd(backend, tokenizer, SERVED, LIMITS)


def test_generate_streams_tokens_and_ends_with_usage_and_timings(front_end, backend):
    request = pb.GenerateRequest(request_id="g-1", prompt="hello world",
                                 sampling=pb.SamplingParams(max_tokens=3, logprobs=1, seed=5))
    context = FakeContext()
    messages = generate(front_end, request, context)
    assert [list(m.token_ids) for m in messages] == [ids("hello"), ids("world"), ids("hello")]
    assert "".join(m.text for m in messages) == "hello world hello "
    assert [m.finish_reason for m in messages] == ["", "", "length"]
    assert all(m.request_id == "g-1" for m in messages) and list(messages[0].logprobs) == [-0.25]
    last = messages[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 3)
    assert last.timings.decode_replica == "decode-0" and last.timings.e2e_s > 0
    assert context.code is None
    assert backend.requests[0].sampling.seed == 5 and backend.requests[0].sampling.logprobs


def test_prompt_logprobs_come_with_the_first_message(front_end, backend):
    request = pb.GenerateRequest(prompt="hello world fox", sampling=pb.SamplingParams(max_tokens=2, prompt_logprobs=1))
    messages = generate(front_end, request, FakeContext())
    first = messages[0].prompt_logprobs
    assert [(p.token_id, p.logprob, p.rank) for p in first] == [(t, -1.0, 2) for t in ids("world fox")]
    assert [list(p.top.token_ids) for p in first] == [[t + 1] for t in ids("world fox")]
    assert not messages[1].prompt_logprobs and backend.requests[0].sampling.prompt_logprobs == 1
    plain = generate(front_end, pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=1)), FakeContext())
    assert not plain[0].prompt_logprobs and backend.requests[1].sampling.prompt_logprobs is None


def test_generate_defaults(front_end, backend):
    generate(front_end, pb.GenerateRequest(prompt_token_ids=ids("the fox")), FakeContext())
    (request,) = backend.requests
    assert request.request_id and request.prompt_token_ids == tuple(ids("the fox"))
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (16, 0.0, 1.0, 0)
    assert sampling.seed is None and not sampling.logprobs


@pytest.mark.parametrize("name", ["", MODEL, ALIAS])
def test_no_model_or_any_served_name_is_served(front_end, name):
    context = FakeContext()
    messages = generate(front_end, pb.GenerateRequest(prompt="hello", model=name), context)
    assert context.code is None and messages[-1].finish_reason


def test_an_unknown_model_is_not_found_naming_the_served_ones(front_end):
    context = FakeContext()
    with pytest.raises(GenerationError):
        generate(front_end, pb.GenerateRequest(prompt="hello", model=MODEL.upper()), context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert f"`{MODEL}`" in context.details and f"`{ALIAS}`" in context.details


def test_penalties_min_tokens_and_logit_bias_reach_the_backend(front_end, backend):
    sampling = pb.SamplingParams(max_tokens=4, presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=0.8,
                                 min_tokens=2, logit_bias={7: 3.0, 2: -100.0})
    generate(front_end, pb.GenerateRequest(prompt="hello", sampling=sampling), FakeContext())
    options = backend.requests[0].sampling
    assert (options.presence_penalty, options.frequency_penalty) == (-0.5, 1.0)
    assert options.repetition_penalty == pytest.approx(0.8) and options.min_tokens == 2
    assert options.logit_bias == ((2, -100.0), (7, 3.0))


def test_an_unset_repetition_penalty_is_off(front_end, backend):
    generate(front_end, pb.GenerateRequest(prompt="hello"), FakeContext())
    options = backend.requests[0].sampling
    assert (options.repetition_penalty, options.presence_penalty, options.min_tokens, options.logit_bias) == (1.0, 0, 0, ())


BAD_REQUESTS = {
    "no prompt": (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    "both prompts": (pb.GenerateRequest(prompt="hello", prompt_token_ids=[6]), grpc.StatusCode.INVALID_ARGUMENT),
    "token past the vocabulary": (pb.GenerateRequest(prompt_token_ids=[999]), grpc.StatusCode.INVALID_ARGUMENT),
    "prompt past the context": (pb.GenerateRequest(prompt="hello " * 64), grpc.StatusCode.INVALID_ARGUMENT),
    "max_tokens past the context": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=64)),
                                    grpc.StatusCode.INVALID_ARGUMENT),
    "temperature above 2": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(temperature=3)),
                            grpc.StatusCode.INVALID_ARGUMENT),
    "top_k below -1": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(top_k=-2)),
                       grpc.StatusCode.INVALID_ARGUMENT),
    "too many stop strings": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(stop=["a"] * 4)),
                              grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (pb.GenerateRequest(prompt="hello", model="gpt-9"), grpc.StatusCode.NOT_FOUND),
    "presence penalty below -2": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(presence_penalty=-3)),
                                  grpc.StatusCode.INVALID_ARGUMENT),
    "frequency penalty above 2": (pb.GenerateRequest(prompt="hello",
                                                     sampling=pb.SamplingParams(frequency_penalty=2.5)),
                                  grpc.StatusCode.INVALID_ARGUMENT),
    "zero repetition penalty": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(repetition_penalty=0)),
                                grpc.StatusCode.INVALID_ARGUMENT),
    "min_tokens above max_tokens": (pb.GenerateRequest(prompt="hello",
                                                       sampling=pb.SamplingParams(max_tokens=2, min_tokens=3)),
                                    grpc.StatusCode.INVALID_ARGUMENT),
    "logit_bias id past the vocabulary": (pb.GenerateRequest(prompt="hello",
                                                             sampling=pb.SamplingParams(logit_bias={999: 1.0})),
                                          grpc.StatusCode.INVALID_ARGUMENT),
    "prompt_logprobs above 20": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(prompt_logprobs=21)),
                                 grpc.StatusCode.INVALID_ARGUMENT),
    "logit_bias above 100": (pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(logit_bias={7: 101.0})),
                             grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("request_, code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_invalid_requests_end_with_their_status(front_end, backend, request_, code):
    context = FakeContext()
    with pytest.raises(GenerationError) as raised:
        generate(front_end, request_, context)
    assert context.code == code and context.details == raised.value.message
    assert backend.requests == []


@pytest.mark.parametrize("error, code", [
    (Overloaded("decode pool is full", retry_after_s=2), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("no decode replica"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_backend_errors_map_to_grpc_statuses(front_end, backend, error, code):
    backend.refuse = error
    context = FakeContext()
    with pytest.raises(type(error)):
        generate(front_end, pb.GenerateRequest(prompt="hello"), context)
    assert context.code == code and context.details.startswith(error.message)
    assert backend.num_closed == 1


def test_overloaded_details_say_when_to_retry(front_end, backend):
    backend.refuse = Overloaded("full", retry_after_s=1.5)
    context = FakeContext()
    with pytest.raises(Overloaded):
        generate(front_end, pb.GenerateRequest(prompt="hello"), context)
    assert context.details == "full (retry after 2 s)"


def test_a_failure_mid_stream_ends_the_call_with_its_status(front_end, backend):
    backend.fail_after = (2, Unavailable("decode replica lost"))
    context = FakeContext()
    received = []

    async def consume():
        async for message in front_end.Generate(pb.GenerateRequest(prompt="hello world"), grpc_context=context):
            received.append(message)

    with pytest.raises(Unavailable):
        asyncio.run(consume())
    assert len(received) == 2 and context.code == grpc.StatusCode.UNAVAILABLE


def test_an_unexpected_failure_is_internal_without_details_leaking(front_end, backend):
    backend.refuse = RuntimeError("secret")
    context = FakeContext()
    with pytest.raises(GenerationError):
        generate(front_end, pb.GenerateRequest(prompt="hello"), context)
    assert context.code == grpc.StatusCode.INTERNAL and "secret" not in context.details


def test_closing_the_call_early_closes_the_backend_stream(front_end, backend):
    async def take_one():
        messages = front_end.Generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=9)))
        await anext(messages)
        await messages.aclose()

    asyncio.run(take_one())
    assert backend.num_closed == 1


def test_health(front_end, backend):
    ready = asyncio.run(front_end.Health(pb.HealthRequest()))
    assert ready.ready and ready.status == "ok" and ready.decode_replicas == 1
    backend.ready = False
    down = asyncio.run(front_end.Health(pb.HealthRequest(), grpc_context=FakeContext()))
    assert not down.ready and down.status == "no decode replica"
