"""The public surfaces from outside: the openai client, gRPC stubs, API keys, overload, bad input."""
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from tiny_models import reference_tokens
from server import Server

from pdserve.engine.tokenizer import load_tokenizer
from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e
KEY = "sk-test-123"
ALIAS = "tiny-chat"


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "config.yaml"
    config.write_text("decode: {max_running: 2, max_waiting: 3}\nprefill: {max_queued_requests: 4}\n")
    # served as the path exactly as given (what `--model` alone serves) and an alias
    s = Server("--model", str(chat_model[0]), "--served-model-name", str(chat_model[0]), ALIAS,
               "--config", str(config), api_key=KEY)
    yield s
    s.stop()


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_openai_client_with_the_key_completes_and_streams(server, chat_model):
    model = client(server).models.list().data[0].id
    completion = client(server).completions.create(model=model, prompt=[5, 6, 7], max_tokens=6, temperature=0,
                                                   extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    chunks = list(client(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_without_the_key_http_is_refused_but_health_is_open(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="x", prompt="hi", max_tokens=2)
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ping").status_code == 200  # vLLM's probe path, open as /health is


def test_grpc_needs_the_key_in_metadata(server):
    request = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=3))
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        responses = list(stub.Generate(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60))
        assert responses[-1].finish_reason and responses[-1].usage.completion_tokens >= 1


def test_overload_refuses_the_excess_at_once_and_serves_the_rest(server, chat_model):
    headers = {"Authorization": f"Bearer {KEY}"}
    prompt = [9, 10, 11]

    def send(_):
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=120, json={
            "prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True})
        return response, time.monotonic() - started

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(send, range(24)))
    refused = [(r, t) for r, t in results if r.status_code == 429]
    served = [r for r, _ in results if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 24
    assert all(r.headers.get("retry-after") and t < 5 for r, t in refused)
    expected = load_tokenizer(chat_model[0]).decode(reference_tokens(chat_model[1], prompt, 60))
    assert {r.json()["choices"][0]["text"] for r in served} == {expected}
    decode = server.wait_all_blocks_free()
    assert decode and all(r["num_blocks_used"] == 0 for r in decode.values())


BAD_REQUESTS = {
    "malformed json": (b"{not json", 400),
    "empty prompt": ({"prompt": ""}, 400),
    "prompt past the context": ({"prompt": [5] * 5000}, 400),
    "max_tokens zero": ({"prompt": "hi", "max_tokens": 0}, 400),
    "max_tokens past the context": ({"prompt": "hi", "max_tokens": 100000}, 400),
    "negative temperature": ({"prompt": "hi", "temperature": -1}, 400),
    "top_p zero": ({"prompt": "hi", "top_p": 0}, 400),
    "unknown model": ({"prompt": "hi", "model": "gpt-9"}, 404),
    "a vLLM field pdserve does not serve": ({"prompt": "hi", "guided_json": {"type": "object"}}, 400),
    "token id outside the vocabulary": ({"prompt": [10 ** 9]}, 400),
    "wrong type": ({"prompt": "hi", "max_tokens": "ten"}, 400),
    "body too large": ({"prompt": "x" * (5 * 1024 * 1024)}, 413),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, name):
    body, status = BAD_REQUESTS[name]
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                    json={"prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_bad_grpc_input_gets_a_status_with_a_message(server):
    metadata = [("authorization", f"Bearer {KEY}")]
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=3)),
        grpc.StatusCode.NOT_FOUND: pb.GenerateRequest(prompt="hi", model="gpt-9"),
    }
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for code, request in cases.items():
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Generate(request, metadata=metadata, timeout=30))
            assert error.value.code() == code and error.value.details()


def test_the_path_as_given_and_every_alias_are_served_and_others_are_404(server, chat_model):
    path = str(chat_model[0])
    assert [m.id for m in client(server).models.list().data] == [path, ALIAS]
    for name in (path, ALIAS, None):
        extra = {} if name is None else {"model": name}
        response = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
        assert response.status_code == 200 and response.json()["model"] == path, response.text
    with pytest.raises(openai.NotFoundError) as refused:
        client(server).completions.create(model="tiny", prompt="hi", max_tokens=2)
    message = refused.value.body["message"]
    assert "`tiny`" in message and f"`{path}`" in message and f"`{ALIAS}`" in message


def test_grpc_applies_the_same_names(server, chat_model):
    metadata = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for name in (str(chat_model[0]), ALIAS, ""):
            request = pb.GenerateRequest(prompt="hi", model=name, sampling=pb.SamplingParams(max_tokens=2))
            assert list(stub.Generate(request, metadata=metadata, timeout=60))[-1].finish_reason
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", model="tiny"), metadata=metadata, timeout=30))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and f"`{ALIAS}`" in refused.value.details()


def test_oversized_bodies_get_413_and_the_connection_and_server_go_on(server):
    declared = b'{"prompt": "' + b"x" * (64 << 20) + b'"}'

    def chunked():  # no Content-Length: cut where the count passes the limit
        yield b'{"prompt": "'
        for _ in range(1024):
            yield b"x" * 65536

    headers = {**server.headers, "content-type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for content in (declared, chunked()):
            response = http.post("/v1/completions", content=content)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "request_too_large"
        ok = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_a_second_server_on_the_same_ports_is_refused_up_front(server, chat_model):
    """SO_REUSEPORT would let it share the port and split the clients: it exits at once instead."""
    import subprocess
    import sys

    second = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "serve", "--model", str(chat_model[0]),
                             "--http-port", str(server.http_port), "--grpc-port", str(server.grpc_port)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"Address already in use: port {server.http_port}" in second.stderr
    assert client(server).models.list().data  # the first goes on serving
