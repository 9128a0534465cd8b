"""Where TTFT goes outside the engine, at one request in flight: the host plane's share.

    python benchmarks/ttft_host.py TOKENIZER_DIR [--modes colocated,1P1D] [--requests 60]

A 1-layer random model (its forward is negligible even on the CPU), 128-token prompts, 4-token
answers, `pdserve bench --concurrency 1` over HTTP and over gRPC. Per row: the client's TTFT, the
router's own (request received to first token), and the server's queue + prefill + KV parts; the
rest is split into the client side (client TTFT - router TTFT: HTTP/gRPC, the bench client) and
the router side (router TTFT - the parts: choosing replicas, the calls to them, the token stream).
Run it from two checkouts, one after the other, to compare them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Server  # noqa: E402
from shapes import save_random_checkpoint  # noqa: E402

ONE_LAYER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
MODES = {"colocated": ("--colocated", "1"), "1P1D": ("--prefill-replicas", "1", "--decode-replicas", "1")}
SCRATCH = Path("/tmp/ttft_host")


def row(server: Server, mode: str, grpc: bool, requests: int) -> str:
    file = SCRATCH / f"{mode}-{'grpc' if grpc else 'http'}.json"
    command = [sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", server.url, "-q",
               "--prompt-tokens", "128", "--output-tokens", "4", "--num-requests", str(requests),
               "--concurrency", "1", "--warmup", "5", "--out", str(file)]
    if grpc:
        command += ["--grpc", server.grpc_address]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    records = [r for r in json.loads(file.read_text())["runs"][-1]["requests"] if r.get("server") and r["chunk_s"]]

    def ms(values) -> float:
        return 1e3 * statistics.median(values)

    client = ms(r["chunk_s"][0] for r in records)
    router = ms(r["server"]["ttft_s"] for r in records)
    parts = ms(r["server"]["queue_s"] + r["server"]["prefill_s"] + r["server"]["kv_transfer_s"] for r in records)
    return (f"| {mode} | {'gRPC' if grpc else 'HTTP'} | {client:.2f} | {router:.2f} | {parts:.2f} | "
            f"{client - router:.2f} | {router - parts:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("--modes", default="colocated,1P1D")
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    SCRATCH.mkdir(exist_ok=True)
    model = save_random_checkpoint(SCRATCH / "model", ONE_LAYER, args.tokenizer)
    rows = ["| deployment | protocol | client TTFT p50 ms | router TTFT | queue+prefill+KV | client side | router side |",
            "|---|---|---|---|---|---|---|"]
    for mode in args.modes.split(","):
        server = Server("--model", str(model), *MODES[mode])
        try:
            rows += [row(server, mode, grpc, args.requests) for grpc in (False, True)]
        finally:
            server.stop()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
