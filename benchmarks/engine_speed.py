"""Engine speed on one GPU against its limits and against transformers `generate()`.

    python benchmarks/engine_speed.py --out DIR [--shape NAME] [--sweep] [--profile] [--name engine_speed_h100_DATE]

Llama-3-8B shape by default (--shape: a key of benchmarks/shapes.py MODELS, e.g.
qwen3-8b, qwen3-30b-a3b), bfloat16, random weights (the same weights for the engine and
the baseline). In one run it measures the two ceilings (a large device-to-device
copy, bytes read + written; a large bf16 matmul), checks the engine against
transformers in bf16, times each row, and writes DIR/NAME.md (the table) and
DIR/NAME.png (a roofline: achieved FLOP/s against arithmetic intensity).

Rows (time = median):
    decode  B=1,  1,024-token context   floor = bytes / copy rate   (weights + KV read; for an
                                        MoE only the experts the step's tokens were routed to)
    decode  B=64, 1,024-token context
    prefill 1 x 2,048 tokens            floor = FLOPs / matmul rate
    prefill 8 x 512 tokens, packed
Decode is timed two ways: the GPU's time of a graph replay (CUDA events), and the
host's wall time of `ModelRunner.decode` + a synchronize, batch unchanged between
steps (what a scheduler sees). The baseline's decode step is
(t(generate 1 + N tokens) - t(generate 1 token)) / N.

Whether the host's work shows in a decode step: 40 steps with each step's tokens fed
back on the device, queued all at once (the GPU's time a step), each read before the
next is queued, and queued one ahead of the read (the decode loop on the GPU); then
the decode worker's own steady-state step period, reading each step and one ahead.

The Triton GEMV (engine/kernels/gemv.py) is checked first against F.linear on the
five decode shapes; if it fails, the run goes on with `linear.GEMV_MAX_ROWS = 0`
(F.linear everywhere) and says so. Decode B=1, 8, 64 are timed with the GEMV on
and off side by side, and each GEMM shape at one row is timed for every
`gemv.SWEEP_CONFIGS` entry against F.linear (from CUDA graphs, each call on
another layer's weights so that L2 holds none of them).

Other shapes than Llama-3-8B run the GEMV check (dense projections), correctness,
the engine rows and the baseline only: the fp32 oracle of a 30B model would not fit.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


from pdserve.engine import linear as engine_linear
from pdserve.engine.kernels import gemv as gemv_kernel
from pdserve.engine.loader import LoadedModel, _arrange
from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.sharding import ShardLayout
from pdserve.engine.weight_reader import WeightReader
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams
from pdserve.decode_worker.worker import DecodeSettings, DecodeWorker, StreamStart
from pdserve.decode_worker.outbox import Outbox, TokenBatch
from shapes import MODELS

BLOCK_SIZE = 16
LOG: list[str] = []
STASH: dict = {}  # tensors shared between sections (kept out of the JSON)


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


# ---------------------------------------------------------------- models

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


# ---------------------------------------------------------------- sections

def check_correctness(hf, runner, blocks: BlockSource, results: dict) -> None:
    """bf16 engine vs bf16 transformers on the same weights and tokens."""
    vocab = runner.spec.vocab_size
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, vocab, (1024,), generator=gen).tolist()
    table = blocks.take(1024 + 64)
    with torch.inference_mode():
        logits = runner.prefill([PrefillChunk(tuple(prompt), 0, table)])
        engine_steps, tokens = [logits[0]], [int(logits[0].argmax())]
        for step in range(16):
            out = runner.decode([DecodeInput(tokens[-1], len(prompt) + step, table)])
            engine_steps.append(out[0].clone())  # decode() returns the graph's static output
            tokens.append(int(out[0].argmax()))
        eager = runner.decode_eager([DecodeInput(tokens[-2], len(prompt) + 15, table)])[0]
        ref = hf(torch.tensor([prompt + tokens[:-1]], device="cuda"), logits_to_keep=17).logits[0].float()
    STASH.update(sequence=prompt + tokens[:-1], engine=torch.stack(engine_steps).float(), hf_bf16=ref)
    errors = [rel_err(e, r) for e, r in zip(engine_steps, ref)]
    agree = sum(int(e.argmax() == r.argmax()) for e, r in zip(engine_steps, ref))
    results["correctness"] = {
        "prefill_logits_rel_err": errors[0],
        "decode_logits_rel_err_max": max(errors[1:]),
        "decode_logits_rel_err_median": statistics.median(errors[1:]),
        "greedy_agreement": f"{agree}/{len(errors)}",
        "graph_vs_eager_rel_err": rel_err(engine_steps[-1], eager),
    }
    say(f"correctness ({runner.model.spec.architecture} shape, bf16 engine vs bf16 transformers, teacher-forced on the engine's greedy tokens):",
        json.dumps(results["correctness"]))


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


def host_ms(fn, iters: int = 10) -> float:
    """Median host milliseconds of fn() alone, the GPU idle at its start."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_engine(runner, blocks: BlockSource, counts: Counts, results: dict) -> None:
    rows = results["rows"]
    vocab = runner.spec.vocab_size
    graphs = runner.decode_graphs
    t0 = time.perf_counter()
    runner.capture_decode_graphs()
    results["graph_capture_s"] = time.perf_counter() - t0
    say(f"captured {len(graphs.sizes)} decode graphs in {results['graph_capture_s']:.2f} s")
    for batch, context in ((1, 1024), (64, 1024)):
        inputs = decode_inputs(blocks, batch, context, vocab)
        timed = time_decode(runner, inputs)
        eager = gpu_ms(lambda: runner.decode_eager(inputs), warmup=2, iters=5)
        results["host_enqueue_ms"][f"B={batch}"] = timed["enqueue_ms"]
        results["host_enqueue_ms"][f"B={batch}, replay() alone"] = timed["replay_enqueue_ms"]
        touched = experts_touched(runner, inputs) if runner.spec.moe else None
        flops, bytes_ = counts.decode(batch, context, touched)
        rows[f"decode B={batch}, ctx {context}"] = dict(kind="decode", ms=timed["ms"], wall_ms=timed["wall_ms"],
                                                         eager_ms=eager, flops=flops, bytes=bytes_,
                                                         experts_touched=touched)
        if touched is not None:
            say(f"decode B={batch}: {touched} experts read over {sum(l.moe for l in runner.spec.layers)} MoE layers")
        say(f"decode B={batch} ctx={context}: graph replay {timed['ms']:.3f} ms, decode() wall {timed['wall_ms']:.3f} ms, "
            f"eager {eager:.2f} ms, host enqueue {timed['enqueue_ms']:.3f} ms "
            f"(replay() alone {timed['replay_enqueue_ms']:.3f} ms), GEMV_MAX_ROWS={engine_linear.GEMV_MAX_ROWS}")
    for lengths in ([2048], [512] * 8):
        chunks = [PrefillChunk(tuple(torch.randint(0, vocab, (n,)).tolist()), 0, blocks.take(n)) for n in lengths]
        ms = gpu_ms(lambda: runner.prefill(chunks), warmup=2, iters=8)
        flops, bytes_ = counts.prefill(lengths)
        name = f"prefill {len(lengths)} x {lengths[0]}"
        rows[name] = dict(kind="prefill", ms=ms, flops=flops, bytes=bytes_)
        say(f"{name}: {ms:.2f} ms")


def experts_touched(runner, inputs: list[DecodeInput]) -> int:
    """Experts one decode step reads, summed over the MoE layers: an eager step of the same inputs,
    each MoE layer's routing recorded on the way (the step writes the same K/V again)."""
    from pdserve.engine import layers as engine_layers

    counted: list[int] = []
    fused = engine_layers.fused_moe

    def counting(x, w13, w2, topk_weights, topk_ids):
        counted.append(int(topk_ids.unique().numel()))
        return fused(x, w13, w2, topk_weights, topk_ids)

    engine_layers.fused_moe = counting
    try:
        runner.decode_eager(inputs)
    finally:
        engine_layers.fused_moe = fused
    return sum(counted)


def time_step_loops(runner, blocks: BlockSource, results: dict) -> None:
    """Does the host's work show in a decode step? Each batch (1k context) is timed three ways, 40
    steps each, every step's tokens fed back on the device: all steps queued and read at the end
    (the GPU's time a step: the host runs ahead), each step read before the next is queued (the
    host's time adds), and the next step queued before each read (what the decode loop does on
    the GPU). Then the decode worker itself (local prefill, then decode to 96 tokens) both ways."""
    loops = results["step_loops"]
    for batch in (1, 64):
        inputs = decode_inputs(blocks, batch, 1024, runner.spec.vocab_size)
        row = loops[f"B={batch}"] = {name: statistics.median(step_loop_ms(runner, inputs, lag) for _ in range(3))
                                     for name, lag in (("queued", None), ("read each", 0), ("one ahead", 1))}
        for overlap in (False, True):
            row[f"worker, {'one ahead' if overlap else 'read each'}"] = worker_step_ms(runner, batch, 1024, overlap)
        say(f"decode step loops B={batch}: " + json.dumps({k: v if isinstance(v, dict) else round(v, 4)
                                                           for k, v in row.items()}))


def step_loop_ms(runner, inputs: list[DecodeInput], lag: int | None, steps: int = 40) -> float:
    """Milliseconds a step over `steps` steps; lag: steps left unread when the next is queued (None: all)."""
    params = [SamplingParams()] * len(inputs)
    fed = [i._replace(source=row) for row, i in enumerate(inputs)]  # each row's token: its last sample
    runner.decode_and_sample(inputs, params).result()
    torch.cuda.synchronize()
    t0, pending = time.perf_counter(), []
    for _ in range(steps):
        pending.append(runner.decode_and_sample(fed, params))
        while lag is not None and len(pending) > lag:
            pending.pop(0).result()
    for step in pending:
        step.result()
    return (time.perf_counter() - t0) * 1e3 / steps


def worker_step_ms(runner, batch: int, context: int, overlap: bool, max_tokens: int = 96) -> dict:
    """The decode worker's step period in its steady state, from the token events' host times.

    Prompts are `context - max_tokens // 2` tokens, prefilled by the worker itself, so the steady
    window (every sequence decoding, none finished) centres on `context` tokens of KV."""
    settings = DecodeSettings(max_running=batch, prefill_chunk_tokens=16384, overlap_steps=overlap)
    worker = DecodeWorker(runner, None, settings, f"bench-{batch}-{overlap}")
    times: list[list[float]] = [[] for _ in range(batch)]
    finished = threading.Semaphore(0)

    rows: dict[int, int] = {}  # transfer id -> i

    def deliver(batch: TokenBatch):
        now = time.perf_counter()
        for transfer_id in batch.transfer_ids:
            times[rows[transfer_id]].append(now)
        for _ in batch.endings:
            finished.release()

    outbox = Outbox(deliver)

    gen = torch.Generator().manual_seed(batch)
    deadline = time.time() + 300
    try:
        for i in range(batch):
            prompt = tuple(torch.randint(0, runner.spec.vocab_size, (context - max_tokens // 2,), generator=gen).tolist())
            reservation = worker.reserve(f"r{i}", len(prompt), max_tokens, deadline)
            rows[reservation.transfer_id] = i
            worker.open(StreamStart(reservation.transfer_id, f"r{i}", prompt, (), True, max_tokens, SamplingParams(),
                                    frozenset(), deadline), outbox)
        for _ in range(batch):
            assert finished.acquire(timeout=60), "the worker did not finish"
    finally:
        worker.close()
    start, end = max(t[2] for t in times), min(t[-2] for t in times)
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if start <= a and b <= end]
    tokens_in_window = [sum(start <= x <= end for x in t) for t in times]
    return dict(ms=statistics.median(gaps) * 1e3 if gaps else float("nan"), steps=min(tokens_in_window))


def compare_gemv(runner, blocks: BlockSource, results: dict) -> None:
    """Decode B=1, 8, 64 with the Triton GEMV on (GEMV_MAX_ROWS as shipped) and off (0), side by side.
    B=64 is past the bound either way: its two rows measure the noise."""
    graphs, vocab = runner.decode_graphs, runner.spec.vocab_size
    shipped = engine_linear.GEMV_MAX_ROWS  # 0 if check_gemv turned it off
    for batch in (1, 8, 64):
        inputs = decode_inputs(blocks, batch, 1024, vocab)
        for label, max_rows in (("on", shipped), ("off", 0)):
            name = f"decode B={batch}, ctx 1024, GEMV {label} (GEMV_MAX_ROWS={max_rows})"
            if label == "on" and not shipped:
                results["variants"][name] = dict(error="skipped: the GEMV is off for this run")
                continue
            engine_linear.GEMV_MAX_ROWS = max_rows
            graphs._graphs.pop(graphs.size_for(batch), None)  # recaptured with this setting
            try:
                timed = time_decode(runner, inputs)
            except Exception as e:  # the kernel failing on this GPU must not end the run
                results["variants"][name] = dict(error=f"{type(e).__name__}: {e}"[:300])
                say(f"variant {name}: FAILED {results['variants'][name]['error']}")
                shipped = 0  # F.linear from here on
                continue
            results["variants"][name] = timed
            say(f"variant {name}: graph replay {timed['ms']:.3f} ms, decode() wall {timed['wall_ms']:.3f} ms, "
                f"host enqueue {timed['enqueue_ms']:.3f} ms (replay() alone {timed['replay_enqueue_ms']:.3f} ms)")
    engine_linear.GEMV_MAX_ROWS = shipped
    for size in [s for s in graphs.sizes if s <= 8 or s == 64]:
        graphs._graphs.pop(size, None)  # captured again, with the shipped setting, when next needed


def gemm_shapes(runner) -> dict[str, list[torch.Tensor]]:
    """Each dense decode GEMM of the model: its weight in every layer ([N, K] each); MoE experts are not GEMVs."""
    layers = runner.model.weights.layers
    dense = [l.mlp for l in layers if hasattr(l.mlp, "gate_up")]
    shapes = {"qkv": [l.qkv.weight for l in layers], "o": [l.o.weight for l in layers],
              "gate_up": [m.gate_up.weight for m in dense], "down": [m.down.weight for m in dense],
              "lm_head": [runner.model.weights.lm_head.weight]}
    return {name: weights for name, weights in shapes.items() if weights}


def check_gemv(runner, results: dict) -> None:
    """The Triton GEMV against F.linear (fp32) on each decode shape at 1 and 8 rows; off for the run if wrong."""
    from torch.nn.functional import linear

    out = results["gemv_check"] = {}
    for name, weights in gemm_shapes(runner).items():
        w = weights[0]
        for rows in (1, 8):
            x = torch.randn(rows, w.shape[1], dtype=w.dtype, device="cuda")
            try:
                err = rel_err(gemv_kernel.gemv_triton(x, w), linear(x.float(), w.float()))
                out[f"{name} M={rows}"] = err
            except Exception as e:
                out[f"{name} M={rows}"] = f"{type(e).__name__}: {e}"[:300]
    failed = {k: v for k, v in out.items() if not isinstance(v, float) or not v < 2e-2}
    if failed:
        engine_linear.GEMV_MAX_ROWS = 0
    say(f"gemv check (rel. err vs F.linear fp32): {json.dumps(out)}"
        + (f" -> FAILED {sorted(failed)}: the run uses F.linear (GEMV_MAX_ROWS=0)" if failed else ""))


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


def sweep_gemv(runner, results: dict) -> None:
    """Each decode GEMM at one row: F.linear and every gemv.SWEEP_CONFIGS entry; at eight rows F.linear and two
    configs. Each graph calls every layer's weight in turn (lm_head: its one 1 GB weight 4 times), so no weight
    is in L2 when read, as in a decode step."""
    from torch.nn.functional import linear

    out = results["gemv_sweep"] = {}
    eight_rows = {"dot (default at M>1)": gemv_kernel.default_config(8, 4096),
                  "fma (16,512,4,3)": gemv_kernel.GemvConfig(16, 512, 4, 3)}
    for name, weights in gemm_shapes(runner).items():
        weights = weights if len(weights) > 1 else weights * 4
        n, k = weights[0].shape
        row = out[name] = {"shape": [n, k], "default": str(gemv_kernel.default_config(1, n)), "M=1": {}, "M=8": {}}
        x1 = torch.randn(1, k, dtype=weights[0].dtype, device="cuda")
        x8 = torch.randn(8, k, dtype=weights[0].dtype, device="cuda")
        candidates = [("M=1", "F.linear", x1, linear)]
        candidates += [("M=1", str(c), x1, lambda x, w, c=c: gemv_kernel.gemv_triton(x, w, config=c))
                       for c in gemv_kernel.SWEEP_CONFIGS]
        candidates += [("M=8", "F.linear", x8, linear)]
        candidates += [("M=8", label, x8, lambda x, w, c=c: gemv_kernel.gemv_triton(x, w, config=c))
                       for label, c in eight_rows.items()]
        for rows, label, x, fn in candidates:
            try:
                ms = calls_ms([lambda w=w: fn(x, w) for w in weights])
                row[rows][label] = dict(us=ms * 1e3, tbps=n * k * 2 / (ms * 1e-3) / 1e12)
            except Exception as e:  # a config that does not compile or run here: reported, skipped
                row[rows][label] = dict(error=f"{type(e).__name__}: {e}"[:200])
        timed = {label: v for label, v in row["M=1"].items() if "us" in v and label != "F.linear"}
        row["best"] = min(timed, key=lambda label: timed[label]["us"]) if timed else None
        say(f"gemv sweep {name} {n}x{k} M=1: " + ", ".join(
            f"{label} {v['us']:.1f} us {v['tbps']:.2f} TB/s" if "us" in v else f"{label} {v['error']}"
            for label, v in row["M=1"].items()) + f"; best {row['best']}")
        say(f"gemv sweep {name} {n}x{k} M=8: " + ", ".join(
            f"{label} {v['us']:.1f} us" if "us" in v else f"{label} {v['error']}" for label, v in row["M=8"].items()))


def time_baseline(hf, counts: Counts, results: dict) -> None:
    base = results["baseline"]
    vocab = hf.config.vocab_size

    def generate(batch: int, length: int, new: int) -> float:
        ids = torch.randint(0, vocab, (batch, length), device="cuda")
        mask = torch.ones_like(ids)
        run = lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return wall_ms(run, warmup=1, iters=2 if batch * length <= 4096 else 1)

    with torch.inference_mode():
        base["prefill 1 x 2048"] = generate(1, 2048, 1)
        say(f"baseline prefill 1x2048: {base['prefill 1 x 2048']:.1f} ms")
        base["prefill 8 x 512"] = generate(8, 512, 1)
        say(f"baseline prefill 8x512: {base['prefill 8 x 512']:.1f} ms")
        for batch, steps in ((1, 8), (64, 8)):
            one = generate(batch, 1024, 1)
            more = generate(batch, 1024, 1 + steps)
            base[f"decode B={batch}, ctx 1024"] = (more - one) / steps
            say(f"baseline decode B={batch}: {(more - one) / steps:.1f} ms/step")


def sweep_kernels(runner, blocks: BlockSource, results: dict, copy_bps: float) -> None:
    """The attention kernels alone, over their tuning knobs (module constants)."""
    from pdserve.engine.kernels import paged_attention as pa
    from pdserve.engine.kernels import prefill_attention as fa

    spec = runner.spec
    cache = runner.kv_cache.layer(0)
    out = results["sweep"] = {"decode": [], "prefill": []}
    for batch in (1, 64):
        inputs = decode_inputs(blocks, batch, 1024, spec.vocab_size)
        width = runner.decode_graphs.max_blocks
        tables = torch.zeros(batch, width, dtype=torch.int32)
        for i, d in enumerate(inputs):
            tables[i, :len(d.block_ids)] = torch.tensor(d.block_ids)
        tables = tables.cuda()
        lens = torch.full((batch,), 1024, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, spec.num_heads, spec.head_dim, dtype=torch.bfloat16, device="cuda")
        kv_bytes = batch * 1024 * spec.num_kv_heads * spec.head_dim * 2 * 2
        saved = (pa._BLOCK_N, pa._NUM_WARPS, pa._NUM_STAGES, pa._WAVES)
        for cfg in [(64, 4, 2, 2), (64, 4, 3, 2), (32, 4, 2, 2), (128, 8, 2, 2), (64, 4, 2, 4), (128, 4, 3, 4)]:
            pa._BLOCK_N, pa._NUM_WARPS, pa._NUM_STAGES, pa._WAVES = cfg
            try:
                attention = lambda: pa.paged_decode_attention_triton(q, cache[0], cache[1], tables, lens, 0.088)
                ms = calls_ms([attention] * 20)
                out["decode"].append(dict(batch=batch, cfg=cfg, us=ms * 1e3, mbu=kv_bytes / (ms * 1e-3) / copy_bps))
                say(f"sweep decode B={batch} (BLOCK_N, warps, stages, waves)={cfg}: {ms * 1e3:.1f} us, "
                    f"KV MBU {out['decode'][-1]['mbu']:.2f}")
            except Exception as e:  # a config that does not compile
                say(f"sweep decode {cfg}: failed {type(e).__name__}: {e}"[:300])
        pa._BLOCK_N, pa._NUM_WARPS, pa._NUM_STAGES, pa._WAVES = saved
    for lengths in ([2048], [512] * 8):
        total = sum(lengths)
        q = torch.randn(total, spec.num_heads, spec.head_dim, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(total, spec.num_kv_heads, spec.head_dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device="cuda")
        flops = 4 * spec.num_heads * spec.head_dim * sum(n * (n + 1) // 2 for n in lengths)
        saved = (fa._BLOCK_M, fa._BLOCK_N, fa._NUM_WARPS, fa._NUM_STAGES)
        for cfg in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]:
            fa._BLOCK_M, fa._BLOCK_N, fa._NUM_WARPS, fa._NUM_STAGES = cfg
            try:
                ms = calls_ms([lambda: fa.prefill_attention_varlen_triton(q, k, v, cu, max(lengths), 0.088)] * 10)
                out["prefill"].append(dict(lengths=f"{len(lengths)}x{lengths[0]}", cfg=cfg, us=ms * 1e3,
                                           tflops=flops / (ms * 1e-3) / 1e12))
                say(f"sweep prefill {len(lengths)}x{lengths[0]} (BLOCK_M, BLOCK_N, warps, stages)={cfg}: "
                    f"{ms * 1e3:.0f} us per layer, {out['prefill'][-1]['tflops']:.0f} TFLOP/s")
            except Exception as e:
                say(f"sweep prefill {cfg}: failed {type(e).__name__}: {e}"[:300])
        fa._BLOCK_M, fa._BLOCK_N, fa._NUM_WARPS, fa._NUM_STAGES = saved


def profile_steps(runner, blocks: BlockSource, results: dict) -> None:
    """GPU time per kernel (summed over a step), for eager decode and a prefill."""
    from torch.profiler import ProfilerActivity, profile

    vocab = runner.spec.vocab_size
    cases = {
        "decode B=1": lambda inputs=decode_inputs(blocks, 1, 1024, vocab): runner.decode_eager(inputs),
        "decode B=64": lambda inputs=decode_inputs(blocks, 64, 1024, vocab): runner.decode_eager(inputs),
        "prefill 1x2048": lambda chunks=[PrefillChunk(tuple(range(2048)), 0, blocks.take(2048))]: runner.prefill(
            chunks),
    }
    out = results["profile"] = {}
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                key = event.name[:60]
                totals[key] = totals.get(key, 0.0) + event.device_time_total / 1e3
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
        out[name] = {"total_ms": sum(totals.values()), "top": top}
        say(f"profile {name}: kernels {sum(totals.values()):.2f} ms")
        for kernel, ms in top:
            say(f"    {ms:8.3f} ms  {kernel}")


def check_against_fp32(hf, results: dict) -> None:
    """The same 8B-shape model in fp32 (transformers) as the oracle for both bf16 runs."""
    for p in hf.parameters():
        p.data = p.data.float()  # the engine keeps its own references to the bf16 tensors
    torch.cuda.empty_cache()
    with torch.inference_mode():
        ref = hf(torch.tensor([STASH["sequence"]], device="cuda"), logits_to_keep=17).logits[0].float()
    engine, hf_bf16 = STASH["engine"], STASH["hf_bf16"]
    results["vs_fp32"] = {
        "engine_bf16_rel_err_median": statistics.median(rel_err(e, r) for e, r in zip(engine, ref)),
        "transformers_bf16_rel_err_median": statistics.median(rel_err(e, r) for e, r in zip(hf_bf16, ref)),
        "engine_bf16_argmax_agreement": f"{sum(int(e.argmax() == r.argmax()) for e, r in zip(engine, ref))}/17",
        "transformers_bf16_argmax_agreement": f"{sum(int(e.argmax() == r.argmax()) for e, r in zip(hf_bf16, ref))}/17",
    }
    say("8B shape vs transformers fp32 (17 rows):", json.dumps(results["vs_fp32"]))


def check_tiny_models(results: dict) -> None:
    """Tiny random models (tests/tiny_models.py): engine bf16 on CUDA vs transformers fp32 on the CPU,
    teacher-forced on the reference's greedy tokens: argmax agreement and logits relative error."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import ALL_ARCHITECTURES, save_tiny_model
    from pdserve.engine.loader import load_model_dir

    out = results["tiny_bf16"] = {}
    # the last prompt and its tokens pass the sliding models' window several times over
    prompts = [[5, 17, 33, 2, 90, 11, 7], [3, 4], list(range(100, 119)), [42], [(7 * i + 3) % 120 + 2 for i in range(30)]]
    for arch in sorted(ALL_ARCHITECTURES):
        with tempfile.TemporaryDirectory() as tmp:
            reference = save_tiny_model(arch, tmp)
            runner = ModelRunner(load_model_dir(tmp, "cuda", "bfloat16"), num_blocks=16 * len(prompts), block_size=4)
        agree, total, errors = 0, 0, []
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                ref_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                                eos_token_id=None, pad_token_id=0)[0].tolist()
                ref_logits = reference(torch.tensor([ref_tokens])).logits[0, len(prompt) - 1:-1]  # [32, vocab]
                table = tuple(range(i * 16, i * 16 + 16))
                ours = [runner.prefill([PrefillChunk(tuple(prompt), 0, table)])[0]]
                for step in range(31):
                    position = len(prompt) + step
                    ours.append(runner.decode([DecodeInput(ref_tokens[position], position, table)])[0].clone())
                for o, r in zip(ours, ref_logits):
                    agree += int(o.argmax().item() == r.argmax().item())
                    total += 1
                    errors.append(rel_err(o.cpu(), r))
        out[arch] = dict(argmax_agreement=f"{agree}/{total}", logits_rel_err_median=statistics.median(errors),
                         logits_rel_err_max=max(errors))
    say("tiny models, engine bf16 (CUDA) vs transformers fp32 (CPU), teacher-forced:", json.dumps(out))


# ---------------------------------------------------------------- report

def write_report(results: dict, out_dir: Path, name: str) -> str:
    copy_bps, matmul = results["copy_bps"], results["matmul_flops"]
    lines = [
        f"# Engine speed: {results['device']}, {results['date']}",
        "",
        f"{results.get('shape', 'llama3-8b')} shape, bf16, random weights; torch {results['torch']}, triton {results['triton']}, "
        f"transformers {results['transformers']}.",
        f"Ceilings measured in this run: device copy {copy_bps / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul 8192³ {matmul / 1e12:.0f} TFLOP/s.",
        "Decode floor = bytes (weights read once — of an MoE the experts the step's tokens were routed to — "
        "+ KV read + KV written) / copy rate; "
        "prefill floor = FLOPs (linear + causal attention + sampled rows' lm_head) / matmul rate.",
        "",
        "| row | engine ms | floor ms | ratio to floor | MBU / MFU | host wall ms (decode()) | eager ms | "
        "transformers generate() ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results["rows"].items():
        if r["kind"] == "decode":
            floor = r["bytes"] / copy_bps * 1e3
            util = f"MBU {floor / r['ms']:.2f}"
        else:
            floor = r["flops"] / matmul * 1e3
            util = f"MFU {floor / r['ms']:.2f}"
        base = results["baseline"].get(row)
        base_text = "" if base is None else f"{base:.1f}"
        speedup = "" if base is None else f"{base / r['ms']:.1f}x"
        lines.append(
            f"| {row} | {r['ms']:.2f} | {floor:.2f} | {r['ms'] / floor:.2f} | {util} | "
            f"{r.get('wall_ms', float('nan')):.2f} | {r.get('eager_ms', float('nan')):.2f} | "
            f"{base_text} | {speedup} |")
    if "correctness" in results:
        lines += ["", "Correctness (bf16 engine vs bf16 transformers, same weights, teacher-forced on the engine's "
                  "greedy tokens, 1 prefill + 16 decode steps at 1k context): " + json.dumps(results["correctness"])]
    if "vs_fp32" in results:
        lines += ["", "Same 8B-shape model in fp32 (transformers) as the oracle, same 17 rows: "
                  + json.dumps(results["vs_fp32"])]
    if "tiny_bf16" in results:
        lines += ["", "Tiny models (tests/tiny_models.py), engine bf16 on CUDA vs transformers fp32, teacher-forced "
                  "on the reference's 32 greedy tokens x 5 prompts: " + json.dumps(results["tiny_bf16"])]
    if results.get("variants"):
        lines += ["", "| variant | graph replay ms | decode() wall ms | wall - replay ms | host enqueue ms "
                  "(replay() alone) |", "|---|---|---|---|---|"]
        for variant, v in results["variants"].items():
            if "error" in v:
                lines.append(f"| {variant} | {v['error']} | | | |")
            else:
                lines.append(f"| {variant} | {v['ms']:.3f} | {v['wall_ms']:.3f} | {v['wall_ms'] - v['ms']:.3f} | "
                             f"{v['enqueue_ms']:.3f} ({v['replay_enqueue_ms']:.3f}) |")
    if "gemv_check" in results:
        lines += ["", "Triton GEMV vs F.linear fp32 (rel. err): " + json.dumps(results["gemv_check"], default=str)]
    lines += gemv_sweep_lines(results.get("gemv_sweep", {}))
    if results.get("note"):
        lines += ["", results["note"]]
    lines += step_loop_lines(results.get("step_loops", {}))
    if results.get("host_enqueue_ms"):
        lines += ["", "Host time to enqueue one decode() (no sync), ms: " + json.dumps(
            {k: round(v, 3) for k, v in results["host_enqueue_ms"].items()})]
    lines += ["", f"Decode graphs: {results.get('graph_capture_s', float('nan')):.2f} s to capture all sizes."]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        plot_roofline(results, out_dir / f"{name}.png")
    except Exception:
        say("roofline plot failed:", traceback.format_exc())
    return text


def step_loop_lines(loops: dict) -> list[str]:
    """The host-overhead table: each way of running steps against the GPU's time a step."""
    if not loops:
        return []
    lines = ["", "Decode step loops, 1k context, greedy, tokens fed back on the device: ms a step "
             "(+ ms over the GPU's time a step, all steps queued ahead); worker rows: the decode worker's "
             "step period in its steady state (median gap between a sequence's tokens; KV centred on 1k)", "",
             "| batch | GPU's time (queued ahead) | read each step | one step ahead | worker, read each | "
             "worker, one ahead |", "|---|---|---|---|---|---|"]
    for batch, row in loops.items():
        base = row["queued"]
        cell = lambda ms: f"{ms:.3f} ({ms - base:+.3f})"
        lines.append(f"| {batch} | {base:.3f} | {cell(row['read each'])} | {cell(row['one ahead'])} | "
                     f"{cell(row['worker, read each']['ms'])} | {cell(row['worker, one ahead']['ms'])} |")
    return lines


def gemv_sweep_lines(sweep: dict) -> list[str]:
    """The per-shape GEMV table: F.linear, the shipped config and the best config at M=1; M=8 alongside."""
    if not sweep:
        return []
    eight_labels = list(next(iter(sweep.values()))["M=8"])
    lines = ["", "Decode GEMMs (from CUDA graphs, no weight in L2): us (TB/s) at M=1; us at M=8", "",
             "| GEMM | N x K | F.linear | shipped config | shipped | best config | best | M=8: "
             + " / ".join(eight_labels) + " |",
             "|---|---|---|---|---|---|---|---|"]
    cell = lambda v: f"{v['us']:.1f} ({v['tbps']:.2f})" if v and "us" in v else (v or {}).get("error", "-")[:60]
    for name, row in sweep.items():
        best = row.get("best")
        eight = " / ".join(f"{row['M=8'][k]['us']:.1f}" if "us" in row["M=8"].get(k, {}) else "err"
                           for k in eight_labels)
        lines.append(f"| {name} | {row['shape'][0]} x {row['shape'][1]} | {cell(row['M=1'].get('F.linear'))} | "
                     f"{row['default']} | {cell(row['M=1'].get(row['default']))} | {best} | "
                     f"{cell(row['M=1'].get(best))} | {eight} |")
    return lines


def plot_roofline(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy_bps, matmul = results["copy_bps"], results["matmul_flops"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = [10 ** (x / 20) for x in range(0, 100)]  # 1 .. 1e5 FLOP/byte
    ax.plot(ai, [min(matmul, a * copy_bps) / 1e12 for a in ai], "k-", lw=1.5, label="roof (measured)")
    ax.axhline(matmul / 1e12, color="gray", ls=":", lw=1)
    ax.text(1.2, matmul / 1e12 * 1.08, f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s", fontsize=8)
    ax.text(1.2, copy_bps * 1.2 / 1e12 * 1.4, f"copy {copy_bps / 1e12:.2f} TB/s", fontsize=8, rotation=28)
    for row, r in results["rows"].items():
        x = r["flops"] / r["bytes"]
        color = "tab:blue" if r["kind"] == "decode" else "tab:red"
        ax.plot(x, r["flops"] / (r["ms"] * 1e-3) / 1e12, "o", color=color)
        ax.annotate(f"engine {row}", (x, r["flops"] / (r["ms"] * 1e-3) / 1e12), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
        base = results["baseline"].get(row)
        if base:
            ax.plot(x, r["flops"] / (base * 1e-3) / 1e12, "x", color=color)
            ax.annotate("generate()", (x, r["flops"] / (base * 1e-3) / 1e12), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of device memory)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Engine roofline, {results.get('shape', 'llama3-8b')} shape bf16, {results['device']}, {results['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=f"engine_speed_{datetime.date.today().isoformat()}")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(MODELS),
                        help="the model shape (benchmarks/shapes.py MODELS); others than llama3-8b run fewer sections")
    parser.add_argument("--sweep", action="store_true", help="also sweep the attention kernels' tuning knobs")
    parser.add_argument("--profile", action="store_true", help="also print GPU time per kernel of eager steps")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    results = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "rows": {}, "baseline": {}, "errors": [], "variants": {}, "host_enqueue_ms": {}, "step_loops": {},
        "shape": args.shape,
    }
    results["copy_bps"], results["matmul_flops"] = measure_ceilings()
    say(f"ceilings: copy {results['copy_bps'] / 1e12:.2f} TB/s, matmul {results['matmul_flops'] / 1e12:.0f} TFLOP/s")
    num_blocks = (64 + 8) * 65 + 1200  # the B=64 and B=8 batches, the B=1 batch, prompts
    hf, runner = build_models(num_blocks, args.shape)
    say(f"models built; GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    counts = Counts(runner.spec)
    blocks = BlockSource(num_blocks)
    sections = [("gemv check", lambda: check_gemv(runner, results)),
                ("correctness", lambda: check_correctness(hf, runner, blocks, results)),
                ("engine", lambda: time_engine(runner, blocks, counts, results)),
                ("step loops", lambda: time_step_loops(runner, blocks, results)),
                ("gemv on/off", lambda: compare_gemv(runner, blocks, results)),
                ("gemv sweep", lambda: sweep_gemv(runner, results))]
    if args.profile:
        sections.append(("profile", lambda: profile_steps(runner, blocks, results)))
    if args.sweep:
        sections.append(("sweep", lambda: sweep_kernels(runner, blocks, results, results["copy_bps"])))
    if args.shape != "llama3-8b":  # the sections that read the shape; no fp32 copy of a 30B model
        sections = [s for s in sections if s[0] in ("gemv check", "correctness", "engine")]
    if not args.no_baseline:
        sections.append(("baseline", lambda: time_baseline(hf, counts, results)))
    if args.shape == "llama3-8b":
        sections.append(("fp32 oracle", lambda: check_against_fp32(hf, results)))
        sections.append(("tiny models", lambda: check_tiny_models(results)))
    for name, section in sections:
        t0 = time.perf_counter()
        try:
            section()
        except Exception:
            results["errors"].append(f"{name}: {traceback.format_exc()}")
            say(f"SECTION {name} FAILED:\n{traceback.format_exc()}")
        say(f"[{name}: {time.perf_counter() - t0:.1f} s]")
        text = write_report(results, args.out, args.name)  # after each section: a partial table survives
    (args.out / f"{args.name}.log").write_text("\n".join(LOG) + "\n")
    print(text)


if __name__ == "__main__":
    main()
