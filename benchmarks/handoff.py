"""What the KV handoff costs: prefill in one process, decode in another, no Ray.

    python benchmarks/handoff.py --device cpu  --shape tiny      --lengths 64,256,1024
    python benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192
    python benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 --kv-dtype fp8_e4m3
    python benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 \
        --backend nccl --prefill-device cuda:0 --decode-device cuda:1

The decode worker (this process) reserves blocks; a prefill worker in a child
process computes the prompt and pushes each layer's KV as it is done (gloo on
the CPU, CUDA IPC on one GPU, NCCL between two). Per prompt length it reports
the prefill time, the KV bytes, the time the handoff adds to TTFT (last layer
computed → transfer acknowledged, which the prefill waits for before returning
the first token), that as a share of prefill, and the orchestration overhead of
the handoff: last layer computed → first decode token out, less one decode step
and less the bare block copy (export + import of the same blocks in one process).
Then the transfer alone: every layer of the prompt's blocks pushed through the
backend and acknowledged, with no prefill to hide behind, as bytes per second;
with nccl, next to the link's rate measured in the same run by plain NCCL
send/recv between the same two GPUs, once per layer-sized message and once for
the whole KV in one message. Random weights; medians over --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pdserve.engine.layers import GatedMlp, RmsNorm
from pdserve.engine.linear import Linear
from pdserve.engine.loader import LoadedModel, LayerWeights, ModelWeights
from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.sharding import ShardLayout
from pdserve.engine.runner import ModelRunner
from pdserve.engine.messages import SamplingParams, StreamStart

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from server import free_port  # noqa: E402  (tests/e2e/server.py)
from shapes import LLAMA3_8B, TINY  # noqa: E402  (benchmarks/shapes.py)
from stack_sampler import StackSampler  # noqa: E402

SHAPES = {"tiny": TINY, "llama3-8b": LLAMA3_8B}
BLOCK_SIZE = 16


def random_model(shape: str, device: torch.device, dtype: torch.dtype, max_len: int) -> LoadedModel:
    """A model of the given shape with random weights made on the device (no files)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**SHAPES[shape], "max_position_embeddings": max_len}, architectures=["LlamaForCausalLM"])
    spec = spec_from_config(config)
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape_):
        return (torch.randn(*shape_, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    h, d = spec.hidden_size, spec.head_dim

    def norm():
        return RmsNorm(torch.ones(h, device=device, dtype=dtype), spec.rms_norm_eps)

    layers = tuple(LayerWeights(
        input_norm=norm(),
        qkv=Linear.dense(w((spec.num_heads + 2 * spec.num_kv_heads) * d, h)),
        o=Linear.dense(w(h, spec.num_heads * d)),
        pre_mlp_norm=norm(),
        mlp=GatedMlp(Linear.dense(w(2 * spec.intermediate_size, h)), Linear.dense(w(h, spec.intermediate_size)), "silu"),
    ) for _ in range(spec.num_layers))
    embed = w(spec.vocab_size, h)
    weights = ModelWeights(embed, layers, norm(), Linear.dense(w(spec.vocab_size, h)))
    return LoadedModel(Path("."), shape, spec, config, weights, dtype, device, ShardLayout.of(spec))


@dataclass(frozen=True)
class Sample:
    length: int
    prefill_s: float
    transfer_wait_s: float
    kv_bytes: int
    overhead_s: float
    push_s: float  # every layer's blocks sent and acknowledged, no compute to overlap


def _prefill_process(args, requests: mp.Queue, results: mp.Queue) -> None:
    """The child: a prefill worker serving destinations from the parent."""
    from pdserve.engine.messages import PrefillRequest
    from pdserve.engine.transfer import make_sender
    from pdserve.cluster.config import load_config
    from pdserve.cluster.settings import prefill_settings
    from pdserve.prefill_worker.worker import PrefillWorker

    device, dtype = torch.device(args.prefill_device), _dtype(args)
    _use(device)
    runner = ModelRunner(random_model(args.shape, device, dtype, args.max_len), _blocks(args), BLOCK_SIZE,
                         kv_cache_dtype=args.kv_dtype)
    sender = make_sender(args.backend, runner.kv_cache, sender_id="bench-prefill")
    worker = PrefillWorker(runner, sender, dataclasses.replace(prefill_settings(load_config()),
                                                              max_batch_tokens=max(args.lengths)), "bench-prefill")
    results.put("ready")
    with StackSampler() if args.sample_stacks else contextlib.nullcontext() as sampler:
        while (item := requests.get()) is not None:
            kind, prompt, destination = item
            if kind == "prefill":
                result = worker.submit(PrefillRequest("bench", tuple(prompt), SamplingParams(), destination,
                                                      time.time() + 120)).result(120)
            else:
                result = _push(sender, runner, destination, -(-len(prompt) // BLOCK_SIZE))
            results.put(result)
    if sampler is not None:
        args.sample_stacks.write_text(sampler.report())
    worker.close()


def _push(sender, runner: ModelRunner, destination, num_blocks: int) -> float:
    """Seconds to send every layer of `num_blocks` blocks and have them acknowledged."""
    ids = list(range(num_blocks))
    started = time.monotonic()
    for layer in range(runner.spec.num_layers):
        sender.send_layer(destination, layer, ids, 0)
    sender.finish(destination, len(ids), timeout_s=120)
    return time.monotonic() - started


def run(args) -> list[Sample]:
    from pdserve.cluster.config import load_config
    from pdserve.cluster.settings import decode_settings
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.engine.transfer import make_receiver

    device, dtype = torch.device(args.decode_device), _dtype(args)
    _use(device)
    runner = ModelRunner(random_model(args.shape, device, dtype, args.max_len), _blocks(args), BLOCK_SIZE,
                         kv_cache_dtype=args.kv_dtype)
    receiver = make_receiver(args.backend, runner.kv_cache, peer_id="bench-decode")
    decode = DecodeWorker(runner, receiver, decode_settings(load_config()), "bench-decode")
    ctx = mp.get_context("spawn")
    requests, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_prefill_process, args=(args, requests, results))
    with _visible(args.visible[0]):
        child.start()
    assert results.get(timeout=600) == "ready"
    samples = []
    try:
        for length in args.lengths:
            for attempt in range(args.repeats + 1):
                sample = _one(decode, requests, results, length, attempt, StreamStart)
                if attempt:  # the first is a warm-up
                    samples.append(sample)
    finally:
        requests.put(None)
        child.join(60)
        decode.close()
    return samples


def _one(decode, requests, results, length: int, attempt: int, stream_start) -> Sample:
    from pdserve.decode_worker.outbox import Outbox, TokenBatch

    # A new prompt each time: a repeated one would come from the prefill's prefix cache
    prompt = [(i * 7919 + attempt * 104729) % 30000 + 1 for i in range(length)]
    reservation = decode.reserve("bench", length, 3, time.time() + 120)
    requests.put(("push", prompt, reservation.destination))
    push_s = results.get(timeout=300)
    decode.abort(reservation.transfer_id)
    reservation = decode.reserve("bench", length, 3, time.time() + 120)
    requests.put(("prefill", prompt, reservation.destination))
    result = results.get(timeout=300)
    first_out = threading.Event()
    times: list[float] = []

    def deliver(batch: TokenBatch):
        if batch.token_ids:
            times.append(time.monotonic())
        if batch.endings:
            first_out.set()

    decode.open(stream_start(reservation.transfer_id, "bench", tuple(prompt), (result.first_token,), False, 3,
                             SamplingParams(), frozenset(), time.time() + 120), Outbox(deliver))
    assert first_out.wait(120) and len(times) == 2
    step = times[1] - times[0]  # one decode step, measured on this very sequence
    copy = _copy_time(decode.runner, length)
    overhead = times[0] - result.last_layer_at - step - copy
    return Sample(length, result.prefill_s, result.transfer_wait_s, result.kv_bytes, overhead, push_s)


def _copy_time(runner: ModelRunner, length: int) -> float:
    """The bare copy of a prompt's blocks, every layer, export then import, in one process."""
    ids = torch.arange(-(-length // BLOCK_SIZE), device=runner.device)
    started = time.monotonic()
    for layer in range(runner.spec.num_layers):
        runner.kv_cache.import_blocks(layer, ids, runner.kv_cache.export_blocks(layer, ids))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.monotonic() - started


def table(samples: list[Sample], args, link: dict[int, float]) -> str:
    rows = ["| prompt tokens | prefill (ms) | KV (MiB) | handoff adds to TTFT (ms) | share of prefill | "
            "orchestration overhead p50 (ms) | transfer alone (ms) | transfer GB/s | link GB/s, same messages |",
            "|---|---|---|---|---|---|---|---|---|"]
    for length in args.lengths:
        mine = [s for s in samples if s.length == length]
        prefill = statistics.median(s.prefill_s for s in mine)
        wait = statistics.median(s.transfer_wait_s for s in mine)
        overhead = statistics.median(s.overhead_s for s in mine)
        push = statistics.median(s.push_s for s in mine)
        kv = mine[0].kv_bytes
        link_rate = f"{link[kv // args.num_layers] / 1e9:.1f}" if link else "n/a"
        rows.append(f"| {length} | {prefill * 1e3:.1f} | {kv / 2 ** 20:.1f} | {wait * 1e3:.2f} | "
                    f"{100 * wait / prefill:.1f}% | {overhead * 1e3:.2f} | {push * 1e3:.2f} | {kv / push / 1e9:.1f} | "
                    f"{link_rate} |")
    return "\n".join(rows)


def link_rates(args, message_bytes: list[int]) -> dict[int, float]:
    """Plain NCCL send/recv between the two devices: bytes per second for each message size."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    ranks = [ctx.Process(target=_link_rank, args=(rank, device, port, message_bytes, results))
             for rank, device in enumerate((args.decode_device, args.prefill_device))]
    for process, visible in zip(ranks, (args.visible[1], args.visible[0])):
        with _visible(visible):
            process.start()
    rates = results.get(timeout=300)
    for process in ranks:
        process.join(60)
    return rates


def _link_rank(rank: int, device: str, port: int, message_bytes: list[int], results: mp.Queue) -> None:
    """Rank 1 sends, rank 0 receives and times; the same message count per size as the KV layers."""
    import torch.distributed as dist

    _use(torch.device(device))
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device(device))
    rates = {}
    for size in message_bytes:
        buf = torch.randn(size // 2, device=device, dtype=torch.bfloat16)
        times = []
        for attempt in range(8):
            dist.barrier()
            torch.cuda.synchronize(device)
            started = time.monotonic()
            for _ in range(4):
                (dist.send if rank else dist.recv)(buf, 1 - rank)
            torch.cuda.synchronize(device)
            if attempt >= 2:
                times.append((time.monotonic() - started) / 4)
        rates[size] = size / statistics.median(times)
    if rank == 0:
        results.put(rates)
    dist.destroy_process_group()


@contextlib.contextmanager
def _visible(devices: str | None):
    """CUDA_VISIBLE_DEVICES for processes started inside (None: unchanged)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        yield
    finally:
        if devices is not None:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES")
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


def _use(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # "cuda" names no index, which set_device refuses


def _dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def _blocks(args) -> int:
    return 2 * -(-(max(args.lengths) + 2) // BLOCK_SIZE) + 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--backend", choices=("gloo", "cuda_ipc", "nccl"),
                        help="default: cuda_ipc on cuda, gloo on cpu")
    parser.add_argument("--prefill-device", help="default: --device (cuda:0 with nccl)")
    parser.add_argument("--decode-device", help="default: --device (cuda:1 with nccl)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-dtype", choices=("auto", "fp8_e4m3"), default="auto",
                        help="both pools' kv_cache.dtype (fp8_e4m3: half the bytes handed off)")
    parser.add_argument("--isolate", action="store_true",
                        help="each process sees only its own GPU (CUDA_VISIBLE_DEVICES), as Ray gives replicas")
    parser.add_argument("--sample-stacks", type=Path,
                        help="write where the prefill process's threads spent their time (stack_sampler.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.visible = (None, None)
    if args.isolate:  # before anything asks CUDA about devices
        indices = [d.split(":")[1] for d in (args.prefill_device or "cuda:0", args.decode_device or "cuda:1")]
        os.environ["CUDA_VISIBLE_DEVICES"] = indices[1]
        args.visible = tuple(indices)
        args.prefill_device = args.decode_device = "cuda:0"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backend = args.backend or ("cuda_ipc" if args.device == "cuda" else "gloo")
    two_gpus = args.backend == "nccl"
    args.prefill_device = args.prefill_device or ("cuda:0" if two_gpus else args.device)
    args.decode_device = args.decode_device or ("cuda:1" if two_gpus else args.device)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.max_len = max(args.lengths) + 64
    args.num_layers = SHAPES[args.shape]["num_hidden_layers"]
    samples = run(args)
    link = {}
    if two_gpus:
        per_layer = sorted({s.kv_bytes // args.num_layers for s in samples})
        link = link_rates(args, per_layer + [max(s.kv_bytes for s in samples)])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    link_note = (f"\n\nLink, plain NCCL send/recv between the same processes' GPUs, one message "
                 f"of the whole largest KV: {link[max(link)] / 1e9:.1f} GB/s" if link else "")
    where = (f"GPU {args.visible[0]} -> GPU {args.visible[1]}, each process seeing only its own" if args.isolate
             else f"{args.prefill_device} -> {args.decode_device}")
    text = (f"KV handoff, {args.shape} shape, KV {args.kv_dtype}, {name}, {args.backend} ({where}), "
            f"{time.strftime('%Y-%m-%d')}, "
            f"median of {args.repeats}\n\n"
            f"{table(samples, args, link)}{link_note}\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
