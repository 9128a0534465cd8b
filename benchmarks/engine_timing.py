"""The engine benchmarks' clocks and fixtures: GPU and host timers, the two ceilings, FLOP and byte
counts of a step, a random-weight model of a benchmarks/shapes.py shape, and its decode inputs.

benchmarks/engine_speed.py, fp8_speed.py, moe_kernel.py and serving_plane.py share these.
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from pdserve.engine.loader import LoadedModel, _arrange
from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.runner import DecodeInput, ModelRunner
from pdserve.engine.sharding import ShardLayout
from pdserve.engine.weight_reader import WeightReader
from shapes import MODELS

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16
LOG: list[str] = []  # every line said, written beside the report


def say(*args) -> None:
    line = " ".join(str(a) for a in args)
    LOG.append(line)
    print(line, flush=True)


def gpu_ms(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of fn() + synchronize on the host clock."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn, iters: int = 10) -> float:
    """Median host milliseconds of fn() alone, the GPU idle at its start."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def calls_ms(calls: list) -> float:
    """Milliseconds per call, from a CUDA graph of the calls in order (after one eager pass: compiles)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return gpu_ms(graph.replay, warmup=2, iters=7) / len(calls)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()



# ---------------------------------------------------------------- the two ceilings

def measure_ceilings() -> tuple[float, float]:
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(functools.partial(dst.copy_, src), warmup=3, iters=20)
    copy_bps = 2 * src.numel() * 2 / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = gpu_ms(functools.partial(torch.matmul, a, b), warmup=5, iters=20)
    matmul_flops = 2 * 8192**3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return copy_bps, matmul_flops



# ---------------------------------------------------------------- FLOP and byte counts

class Counts:
    """FLOPs and bytes of a step. An MoE's FLOPs count each token's top-k experts; its decode bytes
    count each expert a step's tokens were routed to once (`touched`: experts read, summed over layers)."""

    def __init__(self, spec):
        self.spec = spec
        h, d = spec.hidden_size, spec.head_dim
        self.head_params = spec.vocab_size * h
        moe = spec.moe
        self.expert_params = 0 if moe is None else 3 * h * moe.intermediate_size
        num_experts = 0 if moe is None else moe.num_experts
        moe_layers = sum(layer.moe for layer in spec.layers)
        all_experts = moe_layers * num_experts * self.expert_params
        embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
        self.shared_params = spec.num_params - all_experts - embed  # attention, routers, dense MLPs, norms
        self.active_params = self.shared_params + moe_layers * (moe.top_k if moe else 0) * self.expert_params
        self.linear_params = self.active_params  # multiplied by each token
        self.kv_bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * d * 2

    def attention_flops(self, pairs: int) -> float:
        """QK^T and PV over `pairs` (query, key) pairs, all layers."""
        return 4 * self.spec.num_heads * self.spec.head_dim * pairs * self.spec.num_layers

    def prefill(self, lengths: list[int]) -> tuple[float, float]:
        tokens = sum(lengths)
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        flops = 2 * self.linear_params * tokens + 2 * self.head_params * len(lengths) + self.attention_flops(pairs)
        bytes_ = 2 * (self.spec.num_params - self.head_params) + tokens * self.kv_bytes_per_token
        return flops, bytes_

    def decode(self, batch: int, context: int, touched: int | None = None) -> tuple[float, float]:
        """`touched`: experts read in the step, all layers (None: a dense model)."""
        flops = (2 * (self.linear_params + self.head_params) * batch + self.attention_flops(batch * context))
        read = self.shared_params + (touched or 0) * self.expert_params
        weights = 2 * (read + self.head_params) + 2 * batch * self.spec.hidden_size
        bytes_ = weights + batch * context * self.kv_bytes_per_token + batch * self.kv_bytes_per_token
        return flops, bytes_



# ---------------------------------------------------------------- models and their inputs

def build_models(num_blocks: int, shape: str = "llama3-8b"):
    import transformers

    config_class, model_class, values = MODELS[shape]
    config = getattr(transformers, config_class)(**values, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = getattr(transformers, model_class)(config).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    spec = spec_from_config(config)
    state = dict(hf.state_dict())
    layout = ShardLayout.of(spec)
    # shares all but fused qkv/gate_up (and stacked experts, where transformers keeps them apart)
    weights = _arrange(WeightReader.of_tensors(state), spec, layout, torch.bfloat16, torch.device("cuda"))
    loaded = LoadedModel(Path(f"random-{shape}"), f"random-{shape}", spec, config, weights,
                         torch.bfloat16, torch.device("cuda"), layout)
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_decode_batch=64)
    runner.kv_cache.tensor.normal_()  # never time attention over zeros
    return hf, runner


class BlockSource:
    """Hands out shuffled block ids, as a long-running pool would."""

    def __init__(self, num_blocks: int):
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
        self.decode_batches: dict[tuple[int, int], list[DecodeInput]] = {}

    def take(self, tokens: int) -> tuple[int, ...]:
        n = -(-tokens // BLOCK_SIZE)
        ids, self.free = self.free[:n], self.free[n:]
        assert len(ids) == n, "pool too small"
        return tuple(ids)


def decode_inputs(blocks: BlockSource, batch: int, context: int, vocab: int) -> list[DecodeInput]:
    """A batch whose new tokens sit at position context - 1 (one per batch shape, reused)."""
    if (batch, context) not in blocks.decode_batches:
        gen = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, vocab, (batch,), generator=gen).tolist()
        blocks.decode_batches[batch, context] = [
            DecodeInput(t, context - 1, blocks.take(context + BLOCK_SIZE)) for t in tokens]
    return blocks.decode_batches[batch, context]


def time_decode(runner, inputs: list[DecodeInput]) -> dict:
    """One decode batch, graphed: GPU time of a replay, host wall of decode() + sync, and the host's
    enqueue time of decode() and of the replay alone (each after a sync: what the GPU waits for)."""
    graphs = runner.decode_graphs
    runner.decode(inputs)  # captures the batch's graph if it is not yet
    graph = graphs._graphs[graphs.size_for(len(inputs))]
    wall = wall_ms(lambda: runner.decode(inputs), warmup=3, iters=30)
    replay = gpu_ms(graph.replay, warmup=3, iters=30)
    return dict(ms=replay, wall_ms=wall, enqueue_ms=host_ms(lambda: runner.decode(inputs)),
                replay_enqueue_ms=host_ms(graph.replay))

