"""What benchmarks/engine_speed.py times on the engine: its rows against the ceilings, the host's
share of a decode step (step loops and the decode worker's own period), transformers' `generate()`
as the baseline, the attention kernels' tuning knobs, and a per-kernel profile."""
from __future__ import annotations

import dataclasses
import json
import statistics
import threading
import time

import torch

from engine_timing import BlockSource, Counts, calls_ms, decode_inputs, gpu_ms, say, time_decode, wall_ms
from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings
from pdserve.decode_worker.outbox import Outbox, TokenBatch
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.messages import StreamStart
from pdserve.engine import linear as engine_linear
from pdserve.engine.runner import DecodeInput, PrefillChunk
from pdserve.engine.sampler import SamplingParams


def time_engine(runner, blocks: BlockSource, counts: Counts, results: dict) -> None:
    rows = results["rows"]
    vocab = runner.spec.vocab_size
    graphs = runner.decode_graphs
    t0 = time.perf_counter()
    runner.capture_graphs()
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
    served = load_config({"decode": {"max_running": batch, "overlap_steps": overlap}})
    settings = dataclasses.replace(decode_settings(served), prefill_chunk_tokens=16384)  # each prompt in one chunk
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

