"""On one GPU: `pdserve bench` and `pdserve diagnose` for 1 prefill + 1 decode (half a GPU each,
KV over CUDA IPC) against `--colocated 1`, same model, same workload.

    python benchmarks/gpu_bench.py TOKENIZER_DIR OUT_DIR

The model is a random-weight Llama of about 1B parameters with a real tokenizer
(the device machine has no network).
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import Server  # noqa: E402
from shapes import LLAMA_1B, save_random_checkpoint  # noqa: E402

WORKLOAD = ["--prompt-tokens", "256:2048", "--output-tokens", "64:256", "--num-requests", "48", "--warmup", "4",
            "--rates", "4,8,16,32", "--slo-ttft-ms", "200", "--slo-tpot-ms", "25"]


def run(name: str, args: list[str], directory: Path, out: Path) -> None:
    server = Server("--model", str(directory), *args)
    try:
        for command in (["bench", *WORKLOAD, "--out", str(out / f"{name}-bench.json")],
                        ["diagnose", "--from", str(out / f"{name}-bench.json"), "--slo-ttft-ms", "200",
                         "--slo-tpot-ms", "25", "--out", str(out / f"{name}-diagnose")]):
            subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", *command, "--url", server.url],
                           check=False, timeout=200)
    finally:
        server.stop()


def main() -> None:
    tokenizer_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    directory = save_random_checkpoint(Path("/tmp/llama-1b"), LLAMA_1B, tokenizer_dir)
    half = Path("/tmp/half.yaml")
    half.write_text("prefill: {gpus_per_replica: 0.5}\ndecode: {gpus_per_replica: 0.5}\n"
                    "kv_cache: {memory_fraction: 0.35}\n")
    run("h100-1p1d", ["--config", str(half)], directory, out)
    run("h100-colocated1", ["--colocated", "1"], directory, out)


if __name__ == "__main__":
    main()
