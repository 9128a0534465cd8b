"""Autoscaling end to end: a real local Ray cluster, `pdserve serve --decode-replicas 1:2`, a TPOT SLO one replica cannot hold."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch
from e2e.server import Server

pytestmark = pytest.mark.e2e

CONFIG = """
slo: {ttft_ms: 5000, tpot_ms: 5}
autoscaling: {upscale_delay_s: 1, downscale_delay_s: 5, interval_s: 0.5, drain_timeout_s: 60}
"""
LOAD = [([7 + i, 300 + 13 * i, 42, 99 + i, 5], 40) for i in range(8)]  # (prompt, max_tokens): the 8 clients cycle these
LONG = [([11, 12, 13 + i], 1000) for i in range(4)]  # streams still running while the pool shrinks: drained


def references(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens for prompts of one length, in one batch."""
    out = model.generate(torch.tensor(prompts), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[:, len(prompts[0]):].tolist()


def decode_pool(server: Server) -> dict:
    return server.status()["autoscaling"]["autoscaling"]["pools"]["decode"]


def wait_for(predicate, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_decode_pool_grows_under_load_and_shrinks_after_without_failing_a_request(chat_model, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = Server("--config", str(config), "--model", str(chat_model[0]),
                    "--prefill-replicas", "1", "--decode-replicas", "1:2")
    results: list[tuple[list[int], int, list[int]]] = []
    stop = threading.Event()
    try:
        def client(i: int) -> None:
            while not stop.is_set():
                prompt, max_tokens = LOAD[i % len(LOAD)]
                results.append((prompt, max_tokens, generate(server, prompt, max_tokens)))
                i += 1

        with ThreadPoolExecutor(8 + len(LONG)) as pool:
            clients = [pool.submit(client, i) for i in range(8)]
            wait_for(lambda: decode_pool(server)["replicas"] == 2, 90, "the decode pool to reach 2 under load")
            time.sleep(3)  # requests keep flowing across the new replica
            stop.set()
            longs = [pool.submit(generate, server, p, n) for p, n in LONG]
            for c in clients:
                c.result()
            wait_for(lambda: decode_pool(server)["replicas"] == 1, 90, "the decode pool to return to 1")
            results += [(p, n, f.result()) for (p, n), f in zip(LONG, longs)]
        note = server.status()["autoscaling"]["autoscaling"]
        assert note["last_decision"].startswith("decode: 2 → 1")
        assert note["decisions"].get("decode/up/tpot_above_slo", 0) >= 1 and note["decisions"].get("decode/down/idle", 0) >= 1
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'pdserve_pool_replicas{pool="decode"} 1' in metrics and 'pdserve_pool_target_replicas{pool="decode"} 1' in metrics
    finally:
        stop.set()
        server.stop()
    expected = {}
    for requests in (LOAD, LONG):
        prompts, max_tokens = [p for p, _ in requests], requests[0][1]
        expected.update({(tuple(p), max_tokens): out for p, out in zip(prompts, references(chat_model[1], prompts, max_tokens))})
    for prompt, max_tokens, output in results:
        assert output == expected[(tuple(prompt), max_tokens)], (prompt, max_tokens)
    assert len(results) > 20


def generate(server: Server, prompt: list[int], max_tokens: int) -> list[int]:
    """Token ids over gRPC (which returns ids, not just text); any failure fails the test."""
    from pdserve.protos.pdserve.v1 import generate_pb2 as pb
    from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(prompt_token_ids=prompt,
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(server.grpc_address) as channel:
        tokens, last = [], None
        for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=180):
            tokens.extend(response.token_ids)
            last = response
    assert last.finish_reason == "length" and len(tokens) == max_tokens
    return tokens
