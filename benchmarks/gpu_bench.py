"""On one GPU: `pdserve bench` and `pdserve diagnose` for 1 prefill + 1 decode (half a GPU each,
KV over CUDA IPC) against `--colocated 1`, same model, same workload.

    python benchmarks/gpu_bench.py TOKENIZER_DIR OUT_DIR

The model is a random-weight Llama of about 1B parameters with a real tokenizer
(the device machine has no network).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import Server  # noqa: E402

WORKLOAD = ["--prompt-tokens", "256:2048", "--output-tokens", "64:256", "--num-requests", "48", "--warmup", "4",
            "--rates", "4,8,16,32", "--slo-ttft-ms", "200", "--slo-tpot-ms", "25"]


def model_dir(tokenizer_dir: Path) -> Path:
    directory = Path("/tmp/llama-1b")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=4096, eos_token_id=2, bos_token_id=1,
                                      rope_theta=500000.0, dtype="bfloat16")
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory


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
    directory = model_dir(tokenizer_dir)
    half = Path("/tmp/half.yaml")
    half.write_text("prefill: {gpus_per_replica: 0.5}\ndecode: {gpus_per_replica: 0.5}\n"
                    "kv_cache: {memory_fraction: 0.35}\n")
    run("h100-1p1d", ["--config", str(half)], directory, out)
    run("h100-colocated1", ["--colocated", "1"], directory, out)


if __name__ == "__main__":
    main()
