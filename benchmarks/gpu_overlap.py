"""On one GPU: what the decode loop running one step ahead gives a user, through `pdserve bench`.

    python benchmarks/gpu_overlap.py TOKENIZER_DIR OUT_DIR [--repeats N] [--deployment NAME] [--in-flight 1,32]

Each deployment (1 prefill + 1 decode on half a GPU each, KV over CUDA IPC; and one
colocated replica) twice, `decode.overlap_steps` false then true, each benched
closed-loop with 1 and with 32 requests in flight (short prompts, 256 output tokens:
decode-bound). Prints one table (TTFT, TPOT, output tokens/s, the decode replica's own
step time and batch), both loops side by side, and writes the bench JSONs. With
--repeats N each bench runs N times on the same server: the table gives the medians
and the range of TPOT p50 (closed-loop runs of a few seconds vary by ~10%).
The model is a random-weight Llama of about 1B parameters: a short step, where the
host's share of a step is largest.
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import Server  # noqa: E402
from shapes import LLAMA_1B, save_random_checkpoint  # noqa: E402

from pdserve.cluster.bench.result import BenchResult  # noqa: E402

WORKLOAD = ["--prompt-tokens", "64:256", "--output-tokens", "256", "--rates", "inf", "--warmup", "2"]
CONCURRENCY = {1: 8, 32: 160}  # in flight -> requests per run
DEPLOYMENTS = {  # name -> config: 1P+1D sharing the GPU (two processes), and one process doing both phases
    "1P+1D, half a GPU each": "prefill: {gpus_per_replica: 0.5}\ndecode: {gpus_per_replica: 0.5, overlap_steps: %s}\n"
                              "kv_cache: {memory_fraction: 0.35}\n",
    "colocated 1": "colocated: {replicas: 1}\ndecode: {overlap_steps: %s}\nkv_cache: {memory_fraction: 0.7}\n",
}


def bench(server: Server, concurrency: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "bench", *WORKLOAD, "-q",
                    "--concurrency", str(concurrency), "--num-requests", str(CONCURRENCY[concurrency]),
                    "--url", server.url, "--out", str(out)], check=True, timeout=240)
    result = BenchResult.load(out)
    run = result.runs[0]
    summary = run.summary(result.slo)
    busy = [r for sample in run.pools for r in sample["pools"].get("decode", {}).values() if r.get("num_running")]
    return {"ttft_p50_ms": 1e3 * summary.ttft.p50, "tpot_p50_ms": 1e3 * summary.tpot.p50,
            "tpot_p90_ms": 1e3 * summary.tpot.p90, "output_tokens_per_s": summary.output_tokens_per_s,
            "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in busy) if busy else float("nan"),
            "batch": statistics.median(r["batch_size"] for r in busy) if busy else float("nan"),
            "failed": summary.num_failed}


def median_row(runs: list[dict]) -> dict:
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row["tpot_p50_range"] = (min(r["tpot_p50_ms"] for r in runs), max(r["tpot_p50_ms"] for r in runs))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--deployment", choices=sorted(DEPLOYMENTS), action="append", help="default: all")
    parser.add_argument("--in-flight", default=",".join(map(str, CONCURRENCY)), help="of " + ", ".join(map(str, CONCURRENCY)))
    args = parser.parse_args()
    directory = save_random_checkpoint(Path("/tmp/llama-1b"), LLAMA_1B, args.tokenizer_dir)
    in_flight = [int(c) for c in args.in_flight.split(",")]
    lines = ["| deployment | in flight | decode loop | TTFT p50 ms | TPOT p50 ms (range) | TPOT p90 ms | output tok/s | "
             "server step ms (median) @ batch | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for deployment in args.deployment or DEPLOYMENTS:
        number, rows = list(DEPLOYMENTS).index(deployment), {}
        for overlap in ("false", "true"):
            config = args.out / f"d{number}-overlap-{overlap}.yaml"
            config.write_text(DEPLOYMENTS[deployment] % overlap)
            server = Server("--model", str(directory), "--config", str(config))
            try:
                for c in in_flight:
                    rows[overlap, c] = median_row([bench(server, c, args.out / f"d{number}-{overlap}-c{c}-{i}.json")
                                                   for i in range(args.repeats)])
            finally:
                server.stop()
        for c in in_flight:
            for overlap, label in (("false", "reads each step"), ("true", "one step ahead")):
                r = rows[overlap, c]
                low, high = r["tpot_p50_range"]
                spread = f" ({low:.2f}-{high:.2f})" if args.repeats > 1 else ""
                lines.append(f"| {deployment} | {c} | {label} | {r['ttft_p50_ms']:.0f} | {r['tpot_p50_ms']:.2f}{spread} | "
                             f"{r['tpot_p90_ms']:.2f} | {r['output_tokens_per_s']:.0f} | {r['step_ms']:.2f} @ "
                             f"{r['batch']:.1f} | {r['failed']:.0f} |")
        (args.out / "overlap.md").write_text("\n".join(lines) + "\n")  # after each deployment: a partial table survives
    print("\n".join(lines))


if __name__ == "__main__":
    main()
