"""Autoscaling on the CPU, shown: load, pool sizes and TTFT/TPOT against the SLOs over time.

Serves the tiny random chat model of `tests/tiny_models.py` three times under the same
load (light → heavy → light → idle): autoscaled (`--decode-replicas 1:2`, prefill 1:2)
and with each fixed decode pool size tried (1 and 2). Writes
`benchmarks/results/autoscaling_demo.png` and `.json`: the timeline of the autoscaled
run, and the share of requests within both SLOs (and the replica-seconds spent) of each.

    .venv/bin/python benchmarks/autoscaling_demo.py      # about 6 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from server import Server  # noqa: E402  (tests/e2e/server.py)
from tiny_models import save_tiny_chat_model  # noqa: E402

SLO_TTFT_MS, SLO_TPOT_MS = 1000.0, 8.0
PHASES = [(20, 2), (50, 12), (25, 2), (20, 0)]  # (seconds, concurrent clients)
CONFIG = f"""
slo: {{ttft_ms: {SLO_TTFT_MS}, tpot_ms: {SLO_TPOT_MS}}}
autoscaling: {{upscale_delay_s: 2, downscale_delay_s: 8, interval_s: 0.5, drain_timeout_s: 60}}
"""


@dataclass
class Request:
    sent_at: float
    ttft_s: float
    tpot_s: float


@dataclass
class Sample:
    at: float
    clients: int
    prefill: int
    decode: int
    target_prefill: int
    target_decode: int


def clients_at(t: float) -> int:
    for seconds, clients in PHASES:
        if t < seconds:
            return clients
        t -= seconds
    return 0


def run(model_dir: Path, config: Path, prefill: str, decode: str) -> tuple[list[Request], list[Sample]]:
    """Serve with these pool sizes, offer the load, return every request's latencies and the pool timeline."""
    args = ("--config", str(config), "--model", str(model_dir), "--prefill-replicas", prefill, "--decode-replicas", decode)
    try:
        server = Server(*args)
    except RuntimeError:  # Ray's node can time out starting on a busy machine: once more
        server = Server(*args)
    requests: list[Request] = []
    samples: list[Sample] = []
    start, total = time.monotonic(), sum(s for s, _ in PHASES)

    def client(index: int) -> None:
        i = 0
        while (t := time.monotonic() - start) < total:
            if index >= clients_at(t):
                time.sleep(0.2)
                continue
            body = {"prompt": [7 + index, 300 + i % 50, 42, 99, 5, 6 + i % 7], "max_tokens": 64,
                    "temperature": 0, "ignore_eos": True}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            timings = response.json()["usage"]["pdserve_timings"] if response.status_code == 200 else None
            if timings:
                requests.append(Request(t, timings["ttft_s"], timings["tpot_s"]))
            else:
                requests.append(Request(t, float("inf"), float("inf")))
            i += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(max(c for _, c in PHASES))]
    try:
        for thread in threads:
            thread.start()
        while (t := time.monotonic() - start) < total:
            status = server.status()
            note = status.get("autoscaling", {}).get("autoscaling", {}).get("pools", {})
            pools = status["pools"]
            sizes = {p: note.get(p, {}).get("replicas", len(pools.get(p, {}))) for p in ("prefill", "decode")}
            targets = {p: note.get(p, {}).get("target", sizes[p]) for p in ("prefill", "decode")}
            samples.append(Sample(t, clients_at(t), sizes["prefill"], sizes["decode"],
                                  targets["prefill"], targets["decode"]))
            time.sleep(1.0)
        for thread in threads:
            thread.join()
    finally:
        server.stop()
    return requests, samples


def within_slo(requests: list[Request]) -> float:
    good = [r for r in requests if r.ttft_s * 1000 <= SLO_TTFT_MS and r.tpot_s * 1000 <= SLO_TPOT_MS]
    return len(good) / len(requests) if requests else 0.0


def replica_seconds(samples: list[Sample]) -> float:
    return sum((b.at - a.at) * (a.prefill + a.decode) for a, b in zip(samples, samples[1:]))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = results["autoscaled"]
    samples, requests = auto["samples"], auto["requests"]
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=False)
    t = [s["at"] for s in samples]
    axes[0].step(t, [s["clients"] for s in samples], where="post", color="black")
    axes[0].set_ylabel("clients in flight")
    axes[0].set_title("pdserve autoscaling on the CPU (tiny model): load, pools, latency against the SLOs")
    for pool, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
        axes[1].step(t, [s[pool] for s in samples], where="post", color=color, label=f"{pool} running")
        axes[1].step(t, [s[f"target_{pool}"] for s in samples], where="post", color=color, linestyle="--",
                     label=f"{pool} target")
    axes[1].set_ylabel("replicas")
    axes[1].set_ylim(0, 3)
    axes[1].legend(loc="upper right", fontsize=8)
    for ax, key, slo, label in ((axes[2], "ttft_s", SLO_TTFT_MS, "TTFT ms"), (axes[3], "tpot_s", SLO_TPOT_MS, "TPOT ms")):
        ax.scatter([r["sent_at"] for r in requests], [r[key] * 1000 for r in requests], s=6)
        ax.axhline(slo, color="red", linestyle="--", label="SLO")
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=8)
    for ax in axes[:4]:
        ax.set_xlabel("seconds")
    names = list(results)
    shares = [results[n]["within_slo"] * 100 for n in names]
    bars = axes[4].bar(names, shares, color=["tab:green"] + ["tab:gray"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        axes[4].text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1,
                     f"{bar.get_height():.0f}% · {results[name]['replica_seconds']:.0f} replica·s", ha="center", fontsize=8)
    axes[4].set_ylabel("% requests within both SLOs")
    axes[4].set_ylim(0, 110)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "autoscaling_demo"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, config = Path(tmp) / "model", Path(tmp) / "config.yaml"
        model_dir.mkdir()
        save_tiny_chat_model(model_dir)
        config.write_text(CONFIG)
        results = {}
        for name, prefill, decode in (("autoscaled", "1:2", "1:2"), ("fixed 1+1", "1", "1"), ("fixed 1+2", "1", "2")):
            requests, samples = run(model_dir, config, prefill, decode)
            results[name] = {"requests": [asdict(r) for r in requests], "samples": [asdict(s) for s in samples],
                             "within_slo": within_slo(requests), "replica_seconds": replica_seconds(samples)}
            print(f"{name}: {len(requests)} requests, {within_slo(requests):.0%} within SLO, "
                  f"{replica_seconds(samples):.0f} replica-seconds", flush=True)
            Path(args.out + ".json").write_text(json.dumps(results))
    plot(results, Path(args.out + ".png"))
    print(f"wrote {args.out}.png and .json")


if __name__ == "__main__":
    main()
