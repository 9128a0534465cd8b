"""A replica killed mid-request costs the client no token; nothing leaks."""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tiny_models import reference_tokens
from server import Server

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(one_and_two):
    return one_and_two


def stream(server: Server, prompt: list[int], max_tokens: int, first_token: threading.Event | None = None,
           arrivals: list[float] | None = None, **sampling) -> list[int]:
    """The request's tokens; `first_token` is set once 5 arrived, `arrivals` gets each response's time."""
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **sampling))
    tokens = []
    with grpc.insecure_channel(server.grpc_address) as channel:
        for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=180):
            tokens.extend(response.token_ids)
            if arrivals is not None:
                arrivals.append(time.monotonic())
            if first_token is not None and len(tokens) >= 5:
                first_token.set()
    return tokens


def pool_pids(server: Server, pool: str) -> dict[str, dict]:
    return server.status()["pools"].get(pool, {})


def busiest_decode(server: Server, timeout_s: float = 15) -> dict:
    """The decode replica running the most sequences, once reports show one running (they lag ~0.5 s)."""
    end = time.monotonic() + timeout_s
    while True:
        busy = max(pool_pids(server, "decode").values(), key=lambda r: r["num_running"])
        if busy["num_running"] > 0 or time.monotonic() > end:
            return busy
        time.sleep(0.2)


def wait_pool_size(server: Server, pool: str, size: int, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while len(pool_pids(server, pool)) != size:
        assert time.monotonic() < end, f"{pool} pool did not come back to {size}: {pool_pids(server, pool)}"
        time.sleep(1)


def assert_exact_and_recovered(server: Server, model, prompts, outputs, max_tokens: int, pool: str, size: int) -> None:
    """Every output is the reference's, the killed pool is back to `size`, and no KV block is held."""
    for prompt, output in zip(prompts, outputs):
        assert output == reference_tokens(model, prompt, max_tokens)
    wait_pool_size(server, pool, size)
    decode = server.wait_all_blocks_free()
    assert decode and all(r["num_blocks_used"] == 0 for r in decode.values()), decode


def test_killing_a_decode_replica_mid_stream_loses_no_token(server, chat_model):
    prompts = [[100 + i, 7, 8, 9 + i] for i in range(8)]
    started = [threading.Event() for _ in prompts]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, server, p, 300, e) for p, e in zip(prompts, started)]
        assert all(e.wait(60) for e in started)
        busy = busiest_decode(server)
        assert busy["num_running"] > 0
        os.kill(busy["pid"], signal.SIGKILL)
        outputs = [f.result(timeout=240) for f in futures]
    assert_exact_and_recovered(server, chat_model[1], prompts, outputs, 300, "decode", 2)


def test_a_seeded_sampled_request_survives_a_kill_unchanged(server):
    prompt = [42, 43, 44]
    sampling = dict(temperature=1.0, top_k=50, seed=1234)
    expected = stream(server, prompt, 250, **sampling)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream, server, prompt, 250, started, **sampling)
        assert started.wait(60)
        busy = busiest_decode(server)
        assert busy["num_running"] > 0
        os.kill(busy["pid"], signal.SIGKILL)
        assert future.result(timeout=240) == expected
    wait_pool_size(server, "decode", 2)


def test_killing_the_prefill_replica_mid_prefill_loses_no_request(server, chat_model):
    prompts = [[(i * 37 + j) % 40000 + 5 for j in range(700)] for i in range(8)]
    pid = next(iter(pool_pids(server, "prefill").values()))["pid"]
    arrivals = [[] for _ in prompts]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, server, p, 8, None, a) for p, a in zip(prompts, arrivals)]
        # Kill once the first prefill batch answered: the 5,600 prompt tokens take three batches of the
        # pool's 2,048, so later ones are queued or running (a fixed sleep raced a fast machine).
        waited_until = time.monotonic() + 60
        while not any(arrivals) and time.monotonic() < waited_until:
            time.sleep(0.001)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        outputs = [f.result(timeout=240) for f in futures]
    # Some request had no first token yet when the replica died: its prefill was queued or running.
    assert any(a[0] > killed_at for a in arrivals), "every prefill had finished before the kill"
    assert_exact_and_recovered(server, chat_model[1], prompts, outputs, 8, "prefill", 1)
