"""A gRPC client of the server under test: each request's tokens, or its error, and how long it took."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    error: str = ""  # "" or "<grpc status>: <message>"
    elapsed_s: float = 0.0
    timings: dict[str, float | str] = field(default_factory=dict)
    started: threading.Event = field(default_factory=threading.Event)  # set once a few tokens arrived


def generate(address: str, prompt: list[int], max_tokens: int, timeout_s: float = 120,
             outcome: Outcome | None = None) -> Outcome:
    """Greedy, ignoring end-of-sequence, streamed; a failed call is a value, never an exception."""
    outcome = outcome or Outcome()
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    begin = time.monotonic()
    try:
        with grpc.insecure_channel(address) as channel:
            for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s):
                outcome.tokens.extend(response.token_ids)
                if len(outcome.tokens) >= 3:
                    outcome.started.set()
                if response.HasField("timings"):
                    outcome.timings = _timings(response.timings)
    except grpc.RpcError as e:
        outcome.error = f"{e.code().name}: {e.details()}"
    outcome.elapsed_s = time.monotonic() - begin
    outcome.started.set()
    return outcome


def generate_all(address: str, requests: list[tuple[list[int], int]], timeout_s: float = 120) -> list[Outcome]:
    """Every request at once."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: generate(address, *r, timeout_s=timeout_s), requests))


def start_all(pool: ThreadPoolExecutor, address: str, requests: list[tuple[list[int], int]],
              timeout_s: float = 120) -> tuple[list[Outcome], list]:
    """Every request started on `pool`; their outcomes fill in as they run (see `Outcome.started`)."""
    outcomes = [Outcome() for _ in requests]
    futures = [pool.submit(generate, address, *r, timeout_s=timeout_s, outcome=o) for r, o in zip(requests, outcomes)]
    return outcomes, futures


def _timings(timings: pb.PhaseTimings) -> dict[str, float | str]:
    return {f.name: value for f, value in timings.ListFields()}
