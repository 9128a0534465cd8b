"""The disaggregated pipeline end to end: real Ray, real Serve, real HTTP and gRPC, gloo KV transfer."""
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from tiny_models import reference_tokens
from server import Server

pytestmark = pytest.mark.e2e

rng = random.Random(7)
REQUESTS = [([rng.randrange(3, 49000) for _ in range(rng.randrange(1, 70))], rng.randrange(1, 24)) for _ in range(16)]


def complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def run_concurrently(server: Server, requests) -> list[list[int]]:
    """Token ids of each completion, all sent at once over gRPC (which returns ids, not just text)."""
    from pdserve.protos.pdserve.v1 import generate_pb2 as pb
    from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

    def one(item):
        prompt, max_tokens = item
        request = pb.GenerateRequest(prompt_token_ids=prompt,
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        with grpc.insecure_channel(server.grpc_address) as channel:
            tokens, last = [], None
            for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=120):
                tokens.extend(response.token_ids)
                last = response
        assert last.finish_reason == "length" and last.usage.completion_tokens == max_tokens
        return tokens

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.fixture(scope="module")
def one_and_one(chat_model):
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "1", "--decode-replicas", "1")
    yield server
    server.stop()


def test_sixteen_concurrent_requests_equal_transformers(one_and_one, chat_model):
    outputs = run_concurrently(one_and_one, REQUESTS)
    for (prompt, max_tokens), output in zip(REQUESTS, outputs):
        assert output == reference_tokens(chat_model[1], prompt, max_tokens)
    decode = one_and_one.wait_all_blocks_free()
    assert decode and all(not r["overlap_steps"] and r["num_blocks_used"] == 0 for r in decode.values()), decode


def test_http_completion_reports_phases(one_and_one):
    body = complete(one_and_one.url, [5, 6, 7, 8], 4)
    timings = body["usage"]["pdserve_timings"]
    assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    assert timings["prefill_s"] > 0 and timings["kv_bytes"] > 0 and timings["prefill_replica"] != timings["decode_replica"]


def test_a_short_request_admitted_during_a_long_one_finishes_first(one_and_one):
    finished: dict[str, float] = {}

    def run(name, max_tokens):
        complete(one_and_one.url, [11, 12, 13], max_tokens)
        finished[name] = time.monotonic()

    long = threading.Thread(target=run, args=("long", 1000))  # seconds of decoding, whatever the machine
    long.start()
    time.sleep(0.5)  # the long one is decoding
    run("short", 5)
    assert "long" not in finished, "the short request waited for the long one: no continuous batching"
    long.join()
    assert finished["short"] < finished["long"]


def test_a_cancelled_grpc_stream_frees_its_blocks(one_and_one):
    from pdserve.protos.pdserve.v1 import generate_pb2 as pb
    from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(prompt_token_ids=[3] * 40, sampling=pb.SamplingParams(max_tokens=500, ignore_eos=True))
    with grpc.insecure_channel(one_and_one.grpc_address) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request, timeout=120)
        next(call)
        time.sleep(0.5)
        used = [r["num_blocks_used"] for r in one_and_one.status()["pools"]["decode"].values()]
        assert sum(used) > 0
        call.cancel()
    decode = one_and_one.wait_all_blocks_free()
    assert decode and all(r["num_blocks_used"] == 0 for r in decode.values()), decode


def overlapping(tmp_path) -> tuple[str, str]:
    """`--config` of a decode loop that runs one step ahead, as on a GPU (the CPU's default reads each step)."""
    path = tmp_path / "config.yaml"
    path.write_text("decode: {overlap_steps: true}\n")
    return "--config", str(path)


def test_two_and_two_equal_transformers(chat_model, tmp_path):
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "2", "--decode-replicas", "2",
                    *overlapping(tmp_path))
    try:
        outputs = run_concurrently(server, REQUESTS)
        decode = server.wait_all_blocks_free(replicas=2)
        log = server.log_tail()
    finally:
        server.stop()
    for (prompt, max_tokens), output in zip(REQUESTS, outputs):
        assert output == reference_tokens(chat_model[1], prompt, max_tokens)
    assert len(decode) == 2 and all(r["overlap_steps"] and r["num_blocks_used"] == 0 for r in decode.values()), (
        decode, log)


def test_colocated_with_a_stream_interval_gives_the_same_outputs(chat_model, tmp_path):
    # tokens leave the replica 4 at a time (the first at once): the same tokens, fewer messages
    server = Server("--model", str(chat_model[0]), "--colocated", "1", "--stream-interval", "4", *overlapping(tmp_path))
    try:
        outputs = run_concurrently(server, REQUESTS)
        streamed = stream_chunks(server.url, REQUESTS[0][0], 13)
        decode = server.wait_all_blocks_free()
    finally:
        server.stop()
    for (prompt, max_tokens), output in zip(REQUESTS, outputs):
        assert output == reference_tokens(chat_model[1], prompt, max_tokens)
    assert decode and all(r["overlap_steps"] and r["num_blocks_used"] == 0 for r in decode.values()), decode
    # 13 tokens: the first alone, then 4, 4, 4; the finish reason in a chunk of its own
    assert [len(c["logprobs"]["tokens"]) for c in streamed] == [1, 4, 4, 4, 0], streamed


def stream_chunks(url: str, prompt: list[int], max_tokens: int) -> list[dict]:
    """The `choices[0]` of every SSE chunk of a streamed completion (logprobs on: they list its tokens)."""
    import json

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 1}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    return chunks
