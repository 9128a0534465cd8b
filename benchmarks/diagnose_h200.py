"""Issue 24's H200 case in one call: what `pdserve diagnose` says of a busy colocated server, and why.

    python benchmarks/diagnose_h200.py TOKENIZER_DIR OUT_DIR [--shape llama3-8b|tiny] [--modes split,single]
        [--in-flight 256] [--clients 6] [--requests 1000] [--output-tokens 256]

Serves the shape (random bf16 weights in the tokenizer's vocabulary) `--colocated 1` with
decode.max_running = in flight and 4 router replicas, then for each mode runs `pdserve bench`
(128-token prompts, `--output-tokens` answers, closed loop) and `pdserve diagnose --from` its JSON
with the TPOT SLO 20 ms, TTFT 1000 ms:
  split   `pdserve bench --processes` with `--clients` client processes sharing `--in-flight` (what one
          client process can read is not what binds); one JSON holds every process's requests
  single  one bench process holding all `--in-flight` requests (the issue's own command); a client
          too busy to read its streams is then a legitimate HOST (client)
OUT_DIR/diagnose_h200.md gets one row per mode: the verdict (bottleneck, the host part), the
replicas' reported GPU-idle share, batch, step and GPU step, MBU, what the clients received, and
how many reports a replica failed to make (its log's "stats failed" lines); beside it each mode's
diagnose text, JSON and plot, the bench JSON it read, the last status and the server's log.
`--shape tiny` runs on the CPU (a dry run).
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

SHAPES = {"llama3-8b": LLAMA3_8B,
          "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=4096)}
SLO_TPOT_MS, SLO_TTFT_MS, PROMPT_TOKENS = 20, 1000, 128


def say(*parts) -> None:
    print(*parts, flush=True)


def bench(server: Server, out: Path, name: str, clients: int, in_flight: int, requests: int, output_tokens: int,
          timeout_s: float) -> Path | None:
    """One `pdserve bench --processes clients` sharing `in_flight` and `requests`: its JSON (None if unwritten)."""
    file = out / f"{name}-bench.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", server.url, "-q",
             "--prompt-tokens", str(PROMPT_TOKENS), "--output-tokens", str(output_tokens),
             "--num-requests", str(requests), "--concurrency", str(in_flight), "--processes", str(clients),
             "--warmup", "2", "--slo-tpot-ms", str(SLO_TPOT_MS), "--slo-ttft-ms", str(SLO_TTFT_MS),
             "--out", str(file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
        if done.returncode:
            say(f"  {name}: the bench exited {done.returncode}: {done.stderr.decode()[-600:]}")
    except subprocess.TimeoutExpired:
        say(f"  {name}: the bench ran past {timeout_s:.0f} s")
    return file if file.exists() else None


def diagnose(bench_file: Path, out: Path, name: str) -> dict:
    """`pdserve diagnose --from` the file; its text beside the table, its JSON returned."""
    stem = out / f"{name}-diagnose"
    done = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "diagnose", "--from", str(bench_file),
                           "--slo-tpot-ms", str(SLO_TPOT_MS), "--slo-ttft-ms", str(SLO_TTFT_MS), "--out", str(stem)],
                          capture_output=True, text=True, timeout=180)
    (out / f"{name}-diagnose.txt").write_text(done.stdout + done.stderr[-3000:])
    say(done.stdout or done.stderr[-3000:])
    json_file = stem.with_name(stem.name + ".json")
    return json.loads(json_file.read_text()) if json_file.exists() else {}


def replica_reports(file: Path) -> dict:
    """Medians of the decode replicas' reports with sequences running, with the bench's own figures."""
    run = json.loads(file.read_text())["runs"][-1]
    samples = [r for snap in run["pools"] for r in snap["pools"].get("decode", {}).values()
               if r.get("num_running", 0) > 0]

    def median(key: str, scale: float = 1.0) -> float:
        values = [s[key] for s in samples if s.get(key) is not None]
        return scale * statistics.median(values) if values else float("nan")

    summary = run["summary"]
    return {"samples": len(samples), "running": median("num_running"), "batch": median("batch_size"),
            "step_ms": median("step_time_s", 1e3), "gpu_step_ms": median("gpu_step_time_s", 1e3),
            "gpu_idle": median("gpu_idle_share"), "launch_ms": median("launch_time_s", 1e3),
            "mbu_busy": median("mbu_busy"), "mbu_wall": median("mbu_wall"),
            "tokens_per_s": summary["output_tokens_per_s"],
            "tpot_p50_ms": 1e3 * summary["tpot"]["p50"] if summary["tpot"]["p50"] is not None else float("nan"),
            "failed": summary.get("num_failed", 0)}


def stats_failures() -> int:
    """Lines where a replica said its stats failed (cluster/registry.py), in this machine's Ray logs."""
    done = subprocess.run("grep -rh 'its stats failed' /tmp/ray/session_latest/logs 2>/dev/null | wc -l",
                          shell=True, capture_output=True, text=True)
    return int(done.stdout.strip() or 0)


def row(mode: str, clients: int, in_flight: int, verdict: dict, reports: dict) -> str:
    points = verdict.get("points") or [{}]
    replicas = points[-1].get("replicas") or {}
    part = f" ({verdict['host_part']})" if verdict.get("bottleneck") == "host" else ""
    idle = replicas.get("decode_idle_share")
    return (f"| {mode} | {clients} × {in_flight // clients} in flight | "
            f"**{str(verdict.get('bottleneck', 'no verdict')).upper()}{part}** (phase at stake: "
            f"{verdict.get('phase', '-')}) | GPU idle {reports['gpu_idle']:.2f} (diagnose's mean "
            f"{'-' if idle is None else f'{idle:.2f}'}) | batch {reports['batch']:.0f} of {reports['running']:.0f} "
            f"running | step {reports['step_ms']:.2f} ms, GPU {reports['gpu_step_ms']:.2f} ms, launch "
            f"{reports['launch_ms']:.2f} ms | MBU busy {reports['mbu_busy']:.2f}, wall {reports['mbu_wall']:.2f} | "
            f"clients {reports['tokens_per_s']:,.0f} tok/s, TPOT p50 {reports['tpot_p50_ms']:.1f} ms, failed "
            f"{reports['failed']} | {reports['samples']} decode reports under load |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--modes", default="split,single")
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--clients", type=int, default=6, help="bench processes of the split mode")
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode, all clients together")
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--bench-timeout-s", type=float, default=150)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    directory = save_random_checkpoint(Path(f"/tmp/diagnose-{args.shape}"), SHAPES[args.shape], args.tokenizer)
    config = args.out / "colocated.yaml"
    config.write_text(f"decode: {{max_running: {args.in_flight}, max_waiting: {2 * args.in_flight}}}\n")
    say(f"checkpoint ready after {time.monotonic() - started:.0f} s")
    rows = []
    server = Server("--model", str(directory), "--colocated", "1", "--config", str(config), "--router-replicas", "4",
                    startup_timeout_s=300)
    say(f"serving after {time.monotonic() - started:.0f} s")
    try:
        for mode in args.modes.split(","):
            clients = {"split": args.clients, "single": 1}[mode]
            # one process may read far fewer tokens/s than the server makes: half the requests, so it ends in time
            requests = args.requests if mode == "split" else max(args.requests // 2, 2 * args.in_flight)
            file = bench(server, args.out, mode, clients, args.in_flight, requests, args.output_tokens,
                         args.bench_timeout_s)
            if file is None:
                rows.append(f"| {mode} | no bench finished |")
                continue
            rows.append(row(mode, clients, args.in_flight, diagnose(file, args.out, mode), replica_reports(file)))
            say(rows[-1])
            say(f"{mode} done after {time.monotonic() - started:.0f} s")
        (args.out / "status.json").write_text(json.dumps(server.status(), indent=1))
    finally:
        server.stop()
        (args.out / "server.log").write_text(server.log_tail(400))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    text = (f"# pdserve diagnose on a busy colocated server: {args.shape}, {device}, {datetime.date.today()} "
            f"({time.monotonic() - started:.0f} s)\n\n{PROMPT_TOKENS}-token prompts, {args.output_tokens}-token "
            f"answers, SLO TPOT {SLO_TPOT_MS} ms, TTFT {SLO_TTFT_MS} ms; `--colocated 1`, decode.max_running "
            f"{args.in_flight}, 4 router replicas. Replica columns: medians of the decode reports with sequences "
            f"running. Reports a replica failed to make (its stats raised): {stats_failures()}.\n\n"
            "| mode | load | verdict | GPU idle | batch | step | MBU | clients | reports |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (args.out / "diagnose_h200.md").write_text(text)
    say(text)


if __name__ == "__main__":
    main()
