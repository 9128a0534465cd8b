"""On one GPU: what the decode loop running one step ahead gives a user, through `pdserve bench`.

    python benchmarks/gpu_overlap.py TOKENIZER_DIR OUT_DIR

The same 1 prefill + 1 decode deployment (half a GPU each, KV over CUDA IPC) twice,
`decode.overlap_steps` true then false, each benched closed-loop with 1 and with 32
requests in flight (short prompts, 256 output tokens: decode-bound). Prints one table
of TPOT and output tokens/s, both loops side by side, and writes the bench JSONs.
The model is a random-weight Llama of about 1B parameters: a short step, where the
host's share of a step is largest.
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import Server  # noqa: E402
from shapes import LLAMA_1B, save_random_checkpoint  # noqa: E402

from pdserve.cluster.bench import BenchResult  # noqa: E402

WORKLOAD = ["--prompt-tokens", "64:256", "--output-tokens", "256", "--rates", "inf", "--warmup", "2"]
CONCURRENCY = {1: 8, 32: 64}  # in flight -> requests per run


def bench(server: Server, concurrency: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "bench", *WORKLOAD, "-q",
                    "--concurrency", str(concurrency), "--num-requests", str(CONCURRENCY[concurrency]),
                    "--url", server.url, "--out", str(out)], check=True, timeout=240)
    result = BenchResult.load(out)
    summary = result.runs[0].summary(result.slo)
    return {"tpot_p50_ms": 1e3 * summary.tpot.p50, "tpot_p90_ms": 1e3 * summary.tpot.p90,
            "output_tokens_per_s": summary.output_tokens_per_s, "failed": summary.num_failed}


def main() -> None:
    tokenizer_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    directory = save_random_checkpoint(Path("/tmp/llama-1b"), LLAMA_1B, tokenizer_dir)
    rows = {}
    for overlap in ("true", "false"):
        config = out / f"overlap-{overlap}.yaml"
        config.write_text("prefill: {gpus_per_replica: 0.5}\ndecode: {gpus_per_replica: 0.5, overlap_steps: %s}\n"
                          "kv_cache: {memory_fraction: 0.35}\n" % overlap)
        server = Server("--model", str(directory), "--config", str(config))
        try:
            for concurrency in CONCURRENCY:
                rows[overlap, concurrency] = bench(server, concurrency, out / f"overlap-{overlap}-c{concurrency}.json")
        finally:
            server.stop()
    lines = ["| in flight | loop | TPOT p50 ms | TPOT p90 ms | output tokens/s | failed |", "|---|---|---|---|---|---|"]
    for concurrency in CONCURRENCY:
        for overlap, label in (("true", "one step ahead"), ("false", "reads each step")):
            r = rows[overlap, concurrency]
            lines.append(f"| {concurrency} | {label} | {r['tpot_p50_ms']:.2f} | {r['tpot_p90_ms']:.2f} | "
                         f"{r['output_tokens_per_s']:.0f} | {r['failed']} |")
    table = "\n".join(lines)
    (out / "overlap.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
