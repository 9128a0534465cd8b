"""A TP rank SIGKILLed mid-stream: its replica ends, Ray Serve replaces it, the streams complete exactly."""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from e2e.server import Server  # tests/e2e/server.py
from tiny_models import reference_tokens

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

MAX_TOKENS = 200


def stream(server: Server, prompt: list[int], started: threading.Event) -> list[int]:
    """The request's greedy tokens over gRPC; `started` is set once 5 arrived."""
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, ignore_eos=True))
    tokens = []
    with grpc.insecure_channel(server.grpc_address) as channel:
        for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=300):
            tokens.extend(response.token_ids)
            if len(tokens) >= 5:
                started.set()
    return tokens


def decode_replicas(server: Server) -> dict[str, dict]:
    return server.status()["pools"].get("decode", {})


def settled(replicas: dict[str, dict], old_id: str) -> bool:
    return old_id not in replicas and len(replicas) == 1 and all(r["num_blocks_used"] == 0 for r in replicas.values())


def test_a_killed_decode_rank_ends_its_replica_and_the_streams_complete_exactly(chat_model):
    # One decode replica of TP 2: the streams have nowhere to go but the replacement.
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "1", "--decode-replicas", "1",
                    "--decode-tp", "2")
    try:
        end = time.monotonic() + 30
        while not decode_replicas(server) and time.monotonic() < end:  # reports lag the health check
            time.sleep(0.5)
        (old_id, old), = decode_replicas(server).items()
        assert old["tensor_parallel_size"] == 2 and len(old["rank_pids"]) == 1
        prompts = [[100 + i, 7, 8, 9 + i] for i in range(3)]
        started = [threading.Event() for _ in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, server, p, e) for p, e in zip(prompts, started)]
            assert all(e.wait(120) for e in started)
            os.kill(old["rank_pids"][0], signal.SIGKILL)  # rank 1, mid-stream
            outputs = [f.result(timeout=300) for f in futures]
        for prompt, output in zip(prompts, outputs):
            assert output == reference_tokens(chat_model[1], prompt, MAX_TOKENS)
        # replaced, not revived (a dead replica's last report lingers up to 10 s), every block free
        end = time.monotonic() + 30
        while not settled(replicas := decode_replicas(server), old_id) and time.monotonic() < end:
            time.sleep(0.5)
        assert settled(replicas, old_id), replicas
    finally:
        server.stop()
