"""`pdserve serve` with 1 prefill + 1 decode replica, 16 concurrent greedy requests checked against
transformers on the same weights: on one GPU (half the card each, KV over CUDA IPC), or with
--two-gpus on two (a GPU each, KV over NCCL).

    python benchmarks/gpu_pipeline.py TOKENIZER_DIR OUT_DIR [--two-gpus]

TOKENIZER_DIR holds tokenizer files to give the tiny random model a real tokenizer
(the device machine has no network and no embedded model).
"""
import json
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "e2e")]
from server import Server  # noqa: E402  (tests/e2e/server.py)
from tiny_models import save_tiny_model  # noqa: E402

from pdserve.protos.pdserve.v1 import generate_pb2 as pb  # noqa: E402
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402


def tiny_model(directory: Path, tokenizer_dir: Path):
    model = save_tiny_model("llama", directory, vocab_size=49152, num_hidden_layers=2, max_position_embeddings=1024,
                            eos_token_id=2, bos_token_id=1)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    model.generation_config.eos_token_id = None
    return model.cuda()


def generate(server: Server, prompt, max_tokens) -> list[int]:
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True))
    with grpc.insecure_channel(server.grpc_address) as channel:
        return [t for r in pb_grpc.GenerationStub(channel).Generate(request, timeout=120) for t in r.token_ids]


def main() -> None:
    tokenizer_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    two_gpus = "--two-gpus" in sys.argv
    gpus, backend = (1, "nccl") if two_gpus else (0.5, "cuda_ipc")
    model_dir = Path("/tmp/tiny-chat")
    reference = tiny_model(model_dir, tokenizer_dir)
    config = Path("/tmp/gpu-config.yaml")
    config.write_text(f"model: {{dtype: float32}}\nprefill: {{gpus_per_replica: {gpus}}}\n"
                      f"decode: {{gpus_per_replica: {gpus}}}\ntransfer: {{backend: {backend}}}\n")
    rng = random.Random(7)
    requests = [([rng.randrange(3, 49000) for _ in range(rng.randrange(1, 200))], rng.randrange(1, 40))
                for _ in range(16)]
    server = Server("--model", str(model_dir), "--config", str(config))
    try:
        status = server.status()
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda r: generate(server, *r), requests))
        timings = server.status()
    finally:
        server.stop()
    equal = 0
    for (prompt, max_tokens), output in zip(requests, outputs):
        expected = reference.generate(torch.tensor([prompt]).cuda(), max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        equal += output == expected
    report = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "backend": backend,
              "date": time.strftime("%Y-%m-%d"), "requests": len(requests),
              "equal_to_transformers": equal, "pools_at_start": status["pools"], "pools_after": timings["pools"]}
    (out / f"gpu_pipeline_{backend}.json").write_text(json.dumps(report, indent=2))
    where = "a GPU each" if two_gpus else "one GPU"
    print(f"GPU pipeline (1 prefill + 1 decode, {where}, {report['device']}, KV over {backend}): "
          f"{equal}/{len(requests)} outputs equal to transformers")


if __name__ == "__main__":
    main()
