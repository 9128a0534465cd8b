"""The router's CPU time per streamed token, by protocol: what one router replica costs per token.

    python benchmarks/router_cpu.py TOKENIZER_DIR [--in-flight 64] [--tokens 128] [--stream-intervals 1,4]
                                               [--out FILE]

`pdserve serve --colocated 1` on a 1-layer random model, one router replica: once per stream
interval (`--stream-interval`), and once with an API key; `pdserve bench` streams `--in-flight` requests of `--tokens` tokens over HTTP SSE and over
gRPC. Per row: the router replica's CPU time over the bench (from /proc, its process found by
Ray's process title) divided by the tokens the clients received, and the same for the decode
replica. One router core carries about 1e6 / (us per token) tokens/s, so this is the figure that
sets how many routers a host needs. Run it from two checkouts, one after the other, to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Server  # noqa: E402
from shapes import save_random_checkpoint  # noqa: E402

ONE_LAYER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
SCRATCH = Path("/tmp/router_cpu")
API_KEY = "router-cpu-key"


def ray_processes() -> dict[int, str]:
    """Ray's worker processes on this machine, by pid: their process titles ("ray::ServeReplica:...")."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith("ray::"):
                found[int(entry)] = title
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replica_pid(titles: dict[int, str], deployment: str) -> int:
    pids = [pid for pid, title in titles.items() if f":pdserve:{deployment}" in title]
    if len(pids) != 1:
        raise RuntimeError(f"expected one {deployment} replica process, found {pids}")
    return pids[0]


def row(server: Server, name: str, grpc: bool, in_flight: int, tokens: int) -> dict:
    titles = ray_processes()
    pids = {"router": replica_pid(titles, "router"), "decode": replica_pid(titles, "colocated")}
    before = {part: cpu_seconds(pid) for part, pid in pids.items()}
    file = SCRATCH / f"{name}.json"
    command = [sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", server.url, "-q",
               "--prompt-tokens", "32", "--output-tokens", str(tokens), "--num-requests", str(in_flight * 4),
               "--concurrency", str(in_flight), "--warmup", "0", "--out", str(file)]
    if grpc:
        command += ["--grpc", server.grpc_address]
    if server.headers:
        command += ["--api-key", API_KEY]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    used = {part: cpu_seconds(pid) - before[part] for part, pid in pids.items()}
    run = json.loads(file.read_text())["runs"][-1]
    received = sum(r.get("output_tokens") or 0 for r in run["requests"])
    failed = sum(1 for r in run["requests"] if r.get("error"))
    return {"name": name, "tokens": received, "failed": failed,
            "tokens_per_s": run["summary"].get("output_tokens_per_s", 0.0),
            "router_us": 1e6 * used["router"] / max(received, 1), "decode_us": 1e6 * used["decode"] / max(received, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--stream-intervals", default="1,4", help="a server for each (comma-separated)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args()
    SCRATCH.mkdir(exist_ok=True)
    model = save_random_checkpoint(SCRATCH / "model-1layer", ONE_LAYER, args.tokenizer)
    config = SCRATCH / "config.yaml"
    config.write_text(f"decode: {{max_running: {max(args.in_flight, 8)}, max_waiting: {4 * args.in_flight}}}\n")
    rows = []
    servers = [(int(n), None) for n in args.stream_intervals.split(",")] + [(1, API_KEY)]
    for interval, api_key in servers:
        server = Server("--model", str(model), "--colocated", "1", "--config", str(config),
                        *(("--stream-interval", str(interval)) if interval != 1 else ()), api_key=api_key)
        try:
            for grpc in (False, True):
                name = ("gRPC" if grpc else "HTTP") + (", API key" if api_key else "") + \
                       (f", stream interval {interval}" if interval != 1 else "")
                rows.append(row(server, name, grpc, args.in_flight, args.tokens))
                r = rows[-1]
                print(f"{name:30s} router {r['router_us']:6.1f} us/token  decode {r['decode_us']:6.1f} us/token  "
                      f"{r['tokens_per_s']:7.0f} tok/s  failed {r['failed']}", flush=True)
        finally:
            server.stop()
    table = ["| protocol | router CPU us/token | decode replica CPU us/token | clients tok/s | tokens | failed |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['router_us']:.1f} | {r['decode_us']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens']} | "
              f"{r['failed']} |" for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
