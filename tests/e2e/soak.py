"""A soak: a mix of normal, cancelled, timed-out, invalid and oversized requests, with a
replica killed every so often; at the end nothing may be leaked or wrong.

    python tests/e2e/soak.py --minutes 30        # a long run against its own server; prints a report
    (tests/e2e/test_soak.py runs it for a minute in CI)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server import Server

KINDS = ("normal", "normal", "normal", "cancelled", "timed_out", "invalid", "oversized")


@dataclass
class SoakReport:
    outcomes: Counter = field(default_factory=Counter)
    wrong_outputs: int = 0
    replicas_killed: int = 0
    ttft_before_kills: list[float] = field(default_factory=list)
    ttft_during_kills: list[float] = field(default_factory=list)
    blocks_leaked: int = -1
    outstanding: int = -1
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0

    def summary(self) -> dict:
        def p99(values):
            return round(1000 * statistics.quantiles(values, n=100)[98], 1) if len(values) >= 2 else None

        return {"outcomes": dict(self.outcomes), "wrong_outputs": self.wrong_outputs,
                "replicas_killed": self.replicas_killed, "blocks_leaked": self.blocks_leaked,
                "requests_outstanding": self.outstanding,
                "ttft_p99_ms_before_kills": p99(self.ttft_before_kills),
                "ttft_p99_ms_during_kills": p99(self.ttft_during_kills),
                "replica_rss_mb_start": round(self.rss_start_mb), "replica_rss_mb_end": round(self.rss_end_mb)}


def run_soak(server: Server, expected: dict[tuple[int, ...], str], seconds: float, kill_every_s: float,
             concurrency: int = 6, seed: int = 0) -> SoakReport:
    """Drive `server` for `seconds`; `expected` maps greedy prompts to their reference text."""
    report = SoakReport(rss_start_mb=_replica_rss_mb(server))
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    first_kill = time.monotonic() + min(kill_every_s, seconds / 3)
    lock = threading.Lock()

    def client(worker: int) -> None:
        local = random.Random(seed * 1000 + worker)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as http:
            while time.monotonic() < end:
                kind = local.choice(KINDS)
                outcome, ttft, wrong = _one(http, kind, local, expected)
                with lock:
                    report.outcomes[f"{kind}:{outcome}"] += 1
                    report.wrong_outputs += wrong
                    if ttft is not None:
                        (report.ttft_before_kills if time.monotonic() < first_kill else report.ttft_during_kills).append(ttft)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    next_kill = first_kill
    while any(t.is_alive() for t in threads):
        if time.monotonic() >= next_kill and time.monotonic() < end - 5:
            report.replicas_killed += _kill_one(server, rng)
            next_kill += kill_every_s
        time.sleep(0.5)
    pools = _settled(server)
    report.blocks_leaked = sum(r["num_blocks_used"] for r in pools.get("decode", {}).values())
    report.outstanding = sum(r["num_running"] + r["num_waiting"] for r in pools.get("decode", {}).values()) + sum(
        r["queued_requests"] for r in pools.get("prefill", {}).values())
    report.rss_end_mb = _replica_rss_mb(server)
    return report


def _one(http: httpx.Client, kind: str, rng: random.Random, expected: dict) -> tuple[str, float | None, int]:
    """Send one request of `kind`; (outcome, TTFT of a normal one, 1 if its output was wrong)."""
    if kind == "invalid":
        response = http.post("/v1/completions", json={"prompt": "hi", "temperature": -3})
        return str(response.status_code), None, 0
    if kind == "oversized":
        response = http.post("/v1/completions", json={"prompt": [5] * 100_000})
        return str(response.status_code), None, 0
    prompt = list(rng.choice(list(expected)))
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    try:
        timeout = httpx.Timeout(0.3 if kind == "timed_out" else 120)
        with http.stream("POST", "/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                return str(response.status_code), None, 0
            text, ttft = "", None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "error_event", None, 0
                for choice in event.get("choices", []):
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    text += choice.get("text", "")
                if kind == "cancelled" and ttft is not None:
                    return "cancelled", None, 0  # leaving the stream closes it
            return "ok", ttft, int(text != expected[tuple(prompt)])
    except httpx.TimeoutException:
        return "timed_out", None, 0


def _kill_one(server: Server, rng: random.Random) -> int:
    pools = server.status()["pools"]
    candidates = [r for pool in ("prefill", "decode") for r in pools.get(pool, {}).values()]
    if not candidates:
        return 0
    victim = rng.choice(candidates)
    try:
        os.kill(victim["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return 1


def _settled(server: Server, timeout_s: float = 120) -> dict:
    """The pools once every replica is back and idle (or the timeout passes)."""
    end = time.monotonic() + timeout_s
    while True:
        pools = server.status()["pools"]
        decode, prefill = pools.get("decode", {}), pools.get("prefill", {})
        idle = decode and prefill and all(r["num_blocks_used"] == 0 and r["num_running"] + r["num_waiting"] == 0
                                          for r in decode.values()) and all(
            r["queued_requests"] == 0 for r in prefill.values())
        if idle or time.monotonic() > end:
            return pools
        time.sleep(1)


def _replica_rss_mb(server: Server) -> float:
    total = 0.0
    for pool in server.status()["pools"].values():
        for replica in pool.values():
            try:
                status = Path(f"/proc/{replica['pid']}/status").read_text()
            except (FileNotFoundError, KeyError):
                continue
            total += int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) / 1024
    return total


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import reference_tokens, save_tiny_chat_model

    from pdserve.engine.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--kill-every-s", type=float, default=120)
    args = parser.parse_args()
    directory = Path("/tmp/pdserve-soak-model")
    model = save_tiny_chat_model(directory)
    model.generation_config.eos_token_id = None
    tokenizer = load_tokenizer(directory)
    prompts = [tuple(random.Random(i).randrange(3, 49000) for _ in range(8 + 9 * i)) for i in range(6)]
    expected = {p: tokenizer.decode(reference_tokens(model, list(p), 40)) for p in prompts}
    server = Server("--model", str(directory), "--prefill-replicas", "1", "--decode-replicas", "2")
    try:
        report = run_soak(server, expected, args.minutes * 60, args.kill_every_s)
    finally:
        server.stop()
    print(json.dumps(report.summary(), indent=2))


if __name__ == "__main__":
    main()
