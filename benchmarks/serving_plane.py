"""The serving plane against the engine, on one GPU, in one call: what reaches the clients.

    python benchmarks/serving_plane.py TOKENIZER_DIR OUT_DIR [--parts plane,8b] [--seconds S] [--routers 1,2]
                                      [--clients 6] [--stream-intervals 1,4] [--deployments 1P1D]

Parts (each prints its rows; the table is written last, to OUT_DIR/serving_plane.md):
  plane   a 2-layer model (the GPU idles): output tokens/s over HTTP SSE and over gRPC from several
          `pdserve bench` client processes at once (--clients), with each of --routers router replicas
          and each of --stream-intervals.
  8b      Llama-3-8B shape (random bf16 weights, the tokenizer's vocabulary), 128-token prompts,
          256-token answers, 256 in flight: the decode worker's own steady step at batch 256
          (DecodeWorker alone, no server) against what clients receive from `--colocated 1` and
          1 prefill + 1 decode (half the GPU each); the served decode step from the replicas' reports.
          Each 8B deployment also serves one request in flight: TTFT minus the server's own
          queue + prefill + KV parts, and the 128-token prefill against its floor (weights read once).
Clients are one `pdserve bench --processes N` (closed loop; its requests and concurrency shared
among the N client processes, their records merged into one JSON). Host time per running sequence per step and the GPU-idle
share come from the decode replicas' reports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Server  # noqa: E402
from shapes import LLAMA3_8B, save_random_checkpoint  # noqa: E402

TINY_2L = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=4096)
ROWS: list[str] = []


def say(*parts) -> None:
    print(*parts, flush=True)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bench_clients(server: Server, out: Path, name: str, clients: int, in_flight: int, requests: int,
                  prompt: str, output: str, grpc: bool) -> dict:
    """One `pdserve bench --processes clients` (closed loop, `in_flight` requests in flight among them):
    its whole load in one JSON, under /tmp/serving_plane (with its plot); the table goes to `out`."""
    scratch = Path("/tmp/serving_plane")
    scratch.mkdir(exist_ok=True)
    file = scratch / f"{name}.json"
    command = [sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", server.url, "-q",
               "--prompt-tokens", prompt, "--output-tokens", output, "--num-requests", str(requests),
               "--concurrency", str(in_flight), "--processes", str(clients), "--warmup", "2", "--out", str(file)]
    if grpc:
        command += ["--grpc", server.grpc_address]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=400)
    if done.returncode:
        say(f"  bench exited {done.returncode}: {done.stderr.decode()[-400:]}")
    if not file.exists():
        return {"tokens_per_s": 0.0}
    run = json.loads(file.read_text())["runs"][-1]
    s = run["summary"]
    return {"tokens_per_s": s["output_tokens_per_s"], "failed": s.get("num_failed", 0),
            "ttft_p50_ms": 1e3 * s["ttft"]["p50"] if s["ttft"]["p50"] is not None else float("nan"),
            "tpot_p50_ms": 1e3 * s["tpot"]["p50"] if s["tpot"]["p50"] is not None else float("nan"),
            **decode_reports(run["pools"])}


def decode_reports(pools: list[dict]) -> dict:
    """The decode replicas' step time, batch, host time and GPU-idle share, over the busiest samples."""
    samples = [r for snap in pools for pool in ("decode", "colocated") for r in snap["pools"].get(pool, {}).values()
               if r.get("batch_size", 0) > 0]
    if not samples:
        return {}
    top = max(s["batch_size"] for s in samples)
    busy = [s for s in samples if s["batch_size"] >= 0.9 * top]

    def median(key: str) -> float:
        values = [s[key] for s in busy if key in s]
        return statistics.median(values) if values else float("nan")

    return {"batch": median("batch_size"), "step_ms": 1e3 * median("step_time_s"),
            "decode_tokens_per_s": median("tokens_per_s"),
            "gpu_idle": median("gpu_idle_share"), "host_us_per_seq": 1e6 * median("host_s_per_seq")}


def part_plane(tokenizer: Path, out: Path, seconds: float, routers_each: tuple[int, ...], clients: int,
               intervals: tuple[int, ...]) -> None:
    directory = save_random_checkpoint(Path("/tmp/tiny-2l"), TINY_2L, tokenizer)
    config = write_config(out / "plane.yaml", "decode: {max_running: 512, max_waiting: 1024}\n"
                                              "kv_cache: {memory_fraction: 0.3}\n")
    for routers, interval in [(r, i) for i in intervals for r in routers_each]:
        server = Server("--model", str(directory), "--colocated", "1", "--config", str(config),
                        "--router-replicas", str(routers), "--stream-interval", str(interval))
        try:
            for grpc in (False, True):
                for in_flight in (512,):
                    # every request in flight from the start, and refilled for ~`seconds` (a 256-token answer
                    # takes ~1.5 s at 512 in flight); the runs before 2026-12-02 sent 42 per client: ~250 in flight
                    requests = int(in_flight * max(seconds / 1.5, 1.0))
                    name = f"plane-r{routers}-s{interval}-{'grpc' if grpc else 'http'}-{in_flight}"
                    row = bench_clients(server, out, name, clients, in_flight, requests, "64", "256", grpc)
                    line = (f"| plane | {'gRPC' if grpc else 'HTTP'} | routers {routers}, stream interval {interval} | "
                            f"{in_flight} in flight, "
                            f"{clients} clients | {row['tokens_per_s']:,.0f} tok/s | TPOT p50 {row.get('tpot_p50_ms', 0):.1f} ms"
                            f" | step {row.get('step_ms', float('nan')):.2f} ms at batch {row.get('batch', 0):.0f}"
                            f" | decode makes {row.get('decode_tokens_per_s', float('nan')):,.0f} tok/s"
                            f" | host {row.get('host_us_per_seq', float('nan')):.1f} us/seq | GPU idle "
                            f"{row.get('gpu_idle', float('nan')):.2f} | failed {row.get('failed', 0)} |")
                    say(line)
                    ROWS.append(line)
        finally:
            server.stop()


def engine_worker_step(directory: Path, batch: int, context: int) -> float:
    """The decode worker's own steady step (ms) at `batch` sequences of `context` tokens, no server."""
    from engine_steps import worker_step_ms

    from pdserve.engine.loader import load_model_dir
    from pdserve.engine.runner import ModelRunner

    loaded = load_model_dir(directory, torch.device("cuda", 0), "bfloat16")
    runner = ModelRunner(loaded, num_blocks=batch * (context + 256) // 16 + 64, block_size=16, max_decode_batch=batch)
    try:
        return worker_step_ms(runner, batch, context, overlap=True, max_tokens=256)["ms"]
    finally:
        del runner, loaded
        torch.cuda.empty_cache()


def part_8b(tokenizer: Path, out: Path, seconds: float, only: tuple[str, ...]) -> None:
    directory = save_random_checkpoint(Path("/tmp/llama3-8b"), LLAMA3_8B, tokenizer)
    own_ms = engine_worker_step(directory, 256, 256)
    line = f"| 8B | engine | the decode worker alone | batch 256, 256 context | {256 / own_ms * 1e3:,.0f} tok/s | step {own_ms:.2f} ms |"
    say(line)
    ROWS.append(line)
    deployments = {
        "colocated 1": (["--colocated", "1"], "decode: {max_running: 256, max_waiting: 512}\n"),
        "1P+1D": (["--prefill-replicas", "1", "--decode-replicas", "1"],
                  "decode: {max_running: 256, max_waiting: 512, gpus_per_replica: 0.5}\n"
                  "prefill: {gpus_per_replica: 0.5}\nkv_cache: {memory_fraction: 0.35}\n"),
    }
    for name, (flags, yaml) in deployments.items():
        if only and name.replace(" ", "").replace("+", "") not in only:
            continue
        config = write_config(out / f"8b-{name.replace(' ', '')}.yaml", yaml)
        server = Server("--model", str(directory), *flags, "--config", str(config), "--router-replicas", "4")
        try:
            row = bench_clients(server, out, f"8b-{name.replace(' ', '').replace('+', '')}", 6, 256,
                                max(int(seconds / 0.012), 6 * 64), "128", "256", False)
            ratio = row["tokens_per_s"] / (256 / own_ms * 1e3)
            line = (f"| 8B | {name} | served, HTTP | 256 in flight | {row['tokens_per_s']:,.0f} tok/s "
                    f"({ratio:.2f} of the worker alone) | served step {row.get('step_ms', float('nan')):.2f} ms at "
                    f"batch {row.get('batch', 0):.0f} ({row.get('step_ms', float('nan')) / own_ms:.2f}x) | TPOT p50 "
                    f"{row['tpot_p50_ms']:.1f} ms | TTFT p50 {row['ttft_p50_ms']:.0f} ms | decode makes "
                    f"{row.get('decode_tokens_per_s', float('nan')):,.0f} tok/s | GPU idle "
                    f"{row.get('gpu_idle', float('nan')):.2f} | host {row.get('host_us_per_seq', float('nan')):.1f} us/seq |")
            say(line)
            ROWS.append(line)
            diagnose(out, f"8b-{name.replace(' ', '').replace('+', '')}", server if name == "1P+1D" else None)
            single(server, out, name)
        finally:
            server.stop()


def diagnose(out: Path, name: str, confirm_on: Server | None) -> None:
    """`pdserve diagnose` on the bench's JSON (every client process's requests and the replicas' reports);
    with `confirm_on`, `--confirm` against that server (the same workload, a Poisson run)."""
    confirm = (["--confirm", "--url", confirm_on.url, "--prompt-tokens", "128", "--output-tokens", "256",
                "--num-requests", "300", "--processes", "6"] if confirm_on else [])
    result = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "diagnose", "--from",
                             f"/tmp/serving_plane/{name}.json", "--slo-tpot-ms", "20", "--slo-ttft-ms", "1000",
                             "--out", f"/tmp/serving_plane/{name}-diagnose", *confirm],
                            capture_output=True, text=True, timeout=200)
    (out / f"{name}-diagnose.txt").write_text(result.stdout + result.stderr[-2000:])
    say(result.stdout)


def single(server: Server, out: Path, name: str) -> None:
    """One request in flight: the TTFT the server does not explain, and prefill against its floor."""
    file = Path("/tmp/serving_plane") / f"single-{name.replace(' ', '').replace('+', '')}.json"
    subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", server.url, "-q",
                    "--prompt-tokens", "128", "--output-tokens", "16", "--num-requests", "30", "--concurrency", "1",
                    "--seed", "99", "--warmup", "3", "--out", str(file)], check=False, timeout=300)
    records = [r for r in json.loads(file.read_text())["runs"][-1]["requests"] if r.get("server")]
    outside = [r["chunk_s"][0] - r["server"]["queue_s"] - r["server"]["prefill_s"] - r["server"]["kv_transfer_s"]
               for r in records if r["chunk_s"]]
    prefill = [r["server"]["prefill_s"] for r in records]
    floor_ms = 2 * 8.03e9 / 4.18e12 * 1e3  # bf16 weights read once at the copy rate
    line = (f"| 8B | {name} | 1 in flight | 128-token prompt | TTFT p50 "
            f"{1e3 * statistics.median(r['chunk_s'][0] for r in records):.1f} ms, outside queue+prefill+KV "
            f"{1e3 * statistics.median(outside):.1f} ms | prefill p50 {1e3 * statistics.median(prefill):.2f} ms "
            f"({1e3 * statistics.median(prefill) / floor_ms:.2f}x its {floor_ms:.2f} ms floor) |")
    say(line)
    ROWS.append(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--parts", default="plane,8b")
    parser.add_argument("--seconds", type=float, default=12.0, help="rough length of each bench")
    parser.add_argument("--routers", default="1,2", help="the plane part's router replicas, one server each")
    parser.add_argument("--clients", type=int, default=6, help="the plane part's bench processes")
    parser.add_argument("--stream-intervals", default="1", help="the plane part's --stream-interval values")
    parser.add_argument("--deployments", default="", help="the 8b part's deployments (colocated1, 1P1D; default both)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for part in args.parts.split(","):
        try:
            if part == "plane":
                routers = tuple(int(r) for r in args.routers.split(","))
                part_plane(args.tokenizer, args.out, args.seconds, routers, args.clients,
                           tuple(int(n) for n in args.stream_intervals.split(",")))
            else:
                {"8b": part_8b}[part](args.tokenizer, args.out, args.seconds,
                                      tuple(d for d in args.deployments.split(",") if d))
        except Exception as e:  # one part failing still leaves the others' rows
            say(f"part {part} failed: {type(e).__name__}: {e}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    head = (f"# Serving plane, {device}, {datetime.date.today()} ({time.monotonic() - started:.0f} s)\n\n"
            "| model | deployment | what | load | clients receive | more |\n|---|---|---|---|---|---|\n")
    (args.out / "serving_plane.md").write_text(head + "\n".join(ROWS) + "\n")
    say(head + "\n".join(ROWS))


if __name__ == "__main__":
    main()
