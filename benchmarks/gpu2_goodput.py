"""Two GPUs: goodput of 1 prefill + 1 decode (a GPU each, KV over NCCL) against `--colocated 2`.

    python benchmarks/gpu2_goodput.py TOKENIZER_DIR OUT_DIR [--requests N] [--only 1p1d|colocated2]

Same model (Llama-3-8B shape, bf16, random weights, a real tokenizer), same GPUs,
same workloads: `pdserve bench` over a sweep of Poisson rates, then `pdserve
diagnose --from` the bench's JSON, for each (deployment, workload). The tables and
the plot come from `benchmarks/goodput_compare.py` (rerunnable on the JSONs).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import Server  # noqa: E402
from shapes import LLAMA3_8B, save_random_checkpoint  # noqa: E402

SLO = ["--slo-ttft-ms", "1000", "--slo-tpot-ms", "50"]  # the bench's own verdicts; compare re-judges tighter ones
WORKLOADS = {
    # long documents, short answers (summaries, classification): prefill carries the load
    "prefill-heavy": ["--prompt-tokens", "1536:3072", "--output-tokens", "32:96", "--rates", "4,8,12,16,20"],
    # short prompts, long answers (chat, code): decode carries the load
    "decode-heavy": ["--prompt-tokens", "128:512", "--output-tokens", "256:512", "--rates", "4,8,12,16,24"],
}
DEPLOYMENTS = {
    "1p1d": ["--prefill-replicas", "1", "--decode-replicas", "1"],
    "colocated2": ["--colocated", "2"],
}


def cli(*args: str, timeout_s: float, stdout: Path | None = None) -> None:
    sink = open(stdout, "w") if stdout else None
    subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", *args], check=False, timeout=timeout_s, stdout=sink)
    if sink:
        sink.close()


def run_deployment(name: str, directory: Path, out: Path, num_requests: int) -> None:
    started = time.monotonic()
    server = Server("--model", str(directory), *DEPLOYMENTS[name], startup_timeout_s=300)
    print(f"{name}: up in {time.monotonic() - started:.0f} s", flush=True)
    try:
        for workload, args in WORKLOADS.items():
            stem = out / f"{name}-{workload}"
            cli("bench", "--url", server.url, *args, *SLO, "--num-requests", str(num_requests), "--warmup", "8",
                "-q", "--out", f"{stem}-bench.json", timeout_s=400)
            cli("diagnose", "--from", f"{stem}-bench.json", "--out", f"{stem}-diagnose", timeout_s=120,
                stdout=Path(f"{stem}-diagnose.txt"))
    finally:
        shutil.copy(server.log_path, out / f"{name}-server.log")
        server.stop()


def _option(flag: str, default: str | None = None) -> str | None:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def main() -> None:
    tokenizer_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    num_requests = int(_option("--requests", "80"))
    names = [_option("--only")] if _option("--only") else list(DEPLOYMENTS)
    started = time.monotonic()
    directory = save_random_checkpoint(Path("/tmp/llama-8b-shape"), LLAMA3_8B, tokenizer_dir)
    print(f"model ready in {time.monotonic() - started:.0f} s", flush=True)
    for name in names:
        run_deployment(name, directory, out, num_requests)
    subprocess.run([sys.executable, str(Path(__file__).with_name("goodput_compare.py")), str(out),
                    str(out / "goodput_2gpu")], check=False)


if __name__ == "__main__":
    main()
