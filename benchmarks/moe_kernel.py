"""The fused MoE kernel on one GPU against the bytes of the experts it touches, and against torch.

    python benchmarks/moe_kernel.py [--out DIR] [--sweep] [--tokens 1,64] [--prefill 4096] [--pairs 1,2,4,8,16]

One Qwen3-30B-A3B MoE layer (hidden 2048, moe_intermediate 768, 128 experts, top-8),
bfloat16, random weights and random routing (softmax of random logits, top-k).

Rows, per token count T:
    decode  T = 1, 64      floor = touched bytes / copy rate; the touched bytes are the
                           w13 and w2 of every expert some token uses (+ x and out)
    prefill T = 4096       against the matmul rate (2 * T * k * 3 * I * H FLOPs)
Targets (issue 20): T = 1 within 1.5x of its floor; T = 64 at >= 0.6 of the copy rate.

The kernel is timed from a CUDA graph (capturing it is part of the check: the decode path
must be capturable) of CALLS calls, each on another routing and alternating between
two layers' weights, so L2 (50 MB) holds little of what a call reads. The torch
reference (fused_moe_reference, one expert at a time; it reads the routing back to
the host, so no graph) is timed on the host clock with a synchronize. `align` is the
first launch alone (sorting the pairs by expert), from a graph the same way.
Correctness: relative error of the kernel against the reference at every T.
--sweep also times every fused_moe.SWEEP_CONFIGS entry at each T (and every
moe_decode.PAIR_SWEEP_CONFIGS entry at each --pairs T).

Second table, few tokens (--pairs T): the pair-major path (moe_decode.py, two launches)
against the grouped one (fused_moe_triton, five) on the same calls, each against the
touched-bytes floor; the faster one at each T says where fused_moe.SPARSE_PAIRS_PER_EXPERT
should switch (today: pair-major while T * k <= E / 2, T <= 8 here). Then the whole MoE
block as a decode step runs it: router GEMV + routing + experts, the engine's (route()
kernel + fused_moe's dispatch) against the previous one (torch cast, softmax, topk, sum,
divide + the grouped path), floor = touched experts + router weight.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine_timing import calls_ms as graph_ms, measure_ceilings, wall_ms  # benchmarks/engine_timing.py

from pdserve.engine.kernels import fused_moe as moe
from pdserve.engine.kernels import moe_decode
from pdserve.engine.kernels.gemv import gemv
from pdserve.engine.kernels.moe_routing import route

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
DTYPE = torch.bfloat16
DEVICE = "cuda"
CALLS = 16  # calls per graph, each on its own routing
LAYERS = 2  # weight sets the calls alternate between
EXPERT_BYTES = 3 * INTER * HIDDEN * DTYPE.itemsize  # gate, up and down rows of one expert


def make_layers(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for _ in range(LAYERS):
        w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, device=DEVICE, dtype=DTYPE) / HIDDEN**0.5
        w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device=DEVICE, dtype=DTYPE) / INTER**0.5
        layers.append((w13, w2))
    return layers


def make_routers(gen: torch.Generator) -> list[torch.Tensor]:
    """One router weight [E, H] per layer (std 1: routing as spread as make_calls' random logits)."""
    return [torch.randn(EXPERTS, HIDDEN, generator=gen, device=DEVICE, dtype=DTYPE) for _ in range(LAYERS)]


def make_calls(num_tokens: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """CALLS (x, topk_weights, topk_ids), each routed afresh."""
    calls = []
    for _ in range(CALLS):
        x = torch.randn(num_tokens, HIDDEN, generator=gen, device=DEVICE, dtype=DTYPE)
        logits = torch.randn(num_tokens, EXPERTS, generator=gen, device=DEVICE)
        weights, ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
        calls.append((x, weights / weights.sum(dim=-1, keepdim=True), ids))
    return calls


def touched_bytes(calls) -> float:
    """Mean bytes a call must read and write at least: its experts' weights once, x, out."""
    per_call = [ids.unique().numel() * EXPERT_BYTES + 2 * x.numel() * x.element_size() for x, _, ids in calls]
    return sum(per_call) / len(per_call)


def time_kernel(layers, calls, config: moe.MoeConfig | None) -> float:
    return graph_ms([
        lambda i=i, c=c: moe.fused_moe_triton(c[0], *layers[i % LAYERS], c[1], c[2], config=config)
        for i, c in enumerate(calls)
    ])


def row(num_tokens: int, layers, gen, ceilings, sweep: bool) -> dict:
    copy_bps, matmul_flops = ceilings
    calls = make_calls(num_tokens, gen)
    w13, w2 = layers[0]
    x, weights, ids = calls[0]
    out = moe.fused_moe_triton(x, w13, w2, weights, ids)
    ref = moe.fused_moe_reference(x, w13, w2, weights, ids)
    result = dict(tokens=num_tokens, config=str(moe.default_config(num_tokens * TOP_K, EXPERTS)),
                  rel_err=((out.double() - ref.double()).norm() / ref.double().norm()).item(),
                  bytes=touched_bytes(calls), flops=2 * num_tokens * TOP_K * EXPERT_BYTES / DTYPE.itemsize)
    result["us"] = time_kernel(layers, calls, None) * 1e3
    block_m = moe.default_config(num_tokens * TOP_K, EXPERTS).block_m
    result["align_us"] = graph_ms([lambda c=c: moe.moe_align(c[2], EXPERTS, block_m) for c in calls]) * 1e3
    result["ref_us"] = wall_ms(lambda: moe.fused_moe_reference(x, w13, w2, weights, ids), warmup=1, iters=5) * 1e3
    result["floor_us"] = max(result["bytes"] / copy_bps, result["flops"] / matmul_flops) * 1e6
    if sweep:
        result["sweep"] = {}
        for config in moe.SWEEP_CONFIGS:
            try:
                result["sweep"][str(config)] = time_kernel(layers, calls, config) * 1e3
            except Exception as e:  # a config that does not compile or fit here: reported, skipped
                result["sweep"][str(config)] = f"{type(e).__name__}: {e}"[:160]
    return result


def pairs_row(num_tokens: int, layers, routers, gen, ceilings, sweep: bool) -> dict:
    """Pair-major vs grouped experts at one T, then the whole block both ways."""
    copy_bps, _ = ceilings
    calls = make_calls(num_tokens, gen)
    w13, w2 = layers[0]
    x, weights, ids = calls[0]
    ref = moe.fused_moe_reference(x, w13, w2, weights, ids)
    out = moe_decode.moe_pairs_triton(x, w13, w2, weights, ids)
    touched = touched_bytes(calls)
    result = dict(tokens=num_tokens, bytes=touched, floor_us=touched / copy_bps * 1e6,
                  rel_err=((out.double() - ref.double()).norm() / ref.double().norm()).item(),
                  dispatch="pairs" if moe.is_sparse(num_tokens * TOP_K, EXPERTS) else "grouped")

    def experts(fn):
        return graph_ms([lambda i=i, c=c: fn(c[0], *layers[i % LAYERS], c[1], c[2]) for i, c in enumerate(calls)]) * 1e3

    result["pairs_us"] = experts(moe_decode.moe_pairs_triton)
    result["grouped_us"] = experts(moe.fused_moe_triton)

    def block(fn):  # each call on its own x, so its own routing; weights alternate between layers
        return graph_ms([lambda i=i, c=c: fn(c[0], routers[i % LAYERS], *layers[i % LAYERS])
                         for i, c in enumerate(calls)]) * 1e3

    def engine_block(x, router, w13, w2):
        weights, ids = route(gemv(x, router), TOP_K, True)
        return moe.fused_moe(x, w13, w2, weights, ids)

    def previous_block(x, router, w13, w2):
        weights, ids = gemv(x, router).float().softmax(dim=-1).topk(TOP_K, dim=-1)
        return moe.fused_moe_triton(x, w13, w2, weights / weights.sum(dim=-1, keepdim=True), ids)

    block_ref = previous_block(x, routers[0], w13, w2)
    block_out = engine_block(x, routers[0], w13, w2)
    result["block_rel_err"] = ((block_out.double() - block_ref.double()).norm() / block_ref.double().norm()).item()
    router_bytes = EXPERTS * HIDDEN * DTYPE.itemsize
    result["block_floor_us"] = (touched + router_bytes) / copy_bps * 1e6  # routing as make_calls': about as spread
    result["block_us"] = block(engine_block)
    result["previous_block_us"] = block(previous_block)
    if sweep:
        result["sweep"] = {}
        for config in moe_decode.PAIR_SWEEP_CONFIGS:
            try:
                result["sweep"][str(config)] = experts(
                    lambda *args, config=config: moe_decode.moe_pairs_triton(*args, config=config))
            except Exception as e:  # reported, skipped
                result["sweep"][str(config)] = f"{type(e).__name__}: {e}"[:160]
    return result


def pairs_table(rows: list[dict]) -> str:
    lines = [
        "", f"Few tokens: pair-major (moe_decode, default {moe_decode.DEFAULT_PAIR_CONFIG}) vs grouped experts; "
        "whole block = router GEMV + routing + experts (engine) vs torch routing + grouped (previous)", "",
        "| T | dispatch | rel. err | touched MB | floor us | pairs us | x floor | grouped us | x floor "
        "| block floor us | block us | x floor | previous block us | x floor | block rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, bf = r["floor_us"], r["block_floor_us"]
        lines.append(
            f"| {r['tokens']} | {r['dispatch']} | {r['rel_err']:.1e} | {r['bytes'] / 1e6:.1f} | {f:.1f} "
            f"| {r['pairs_us']:.1f} | {r['pairs_us'] / f:.2f} | {r['grouped_us']:.1f} | {r['grouped_us'] / f:.2f} "
            f"| {bf:.1f} | {r['block_us']:.1f} | {r['block_us'] / bf:.2f} | {r['previous_block_us']:.1f} "
            f"| {r['previous_block_us'] / bf:.2f} | {r['block_rel_err']:.1e} |")
    for r in rows:
        if "sweep" in r:
            lines.append(f"\npairs sweep T={r['tokens']} (us; x floor): " + ", ".join(
                f"{name} {v:.1f} ({v / r['floor_us']:.2f})" if isinstance(v, float) else f"{name} {v}"
                for name, v in r["sweep"].items()))
    return "\n".join(lines)


def table(rows: list[dict], ceilings) -> str:
    copy_bps, matmul_flops = ceilings
    lines = [
        f"device {torch.cuda.get_device_name()}; copy {copy_bps / 1e12:.2f} TB/s (read + write), "
        f"matmul {matmul_flops / 1e12:.0f} TFLOP/s; layer {HIDDEN}x{INTER}, E={EXPERTS}, k={TOP_K}, bf16",
        "",
        "| T | config | rel. err | touched MB | kernel us | GB/s | of copy | TFLOP/s | floor us | x floor "
        "| align us | torch ref us | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gbps = r["bytes"] / (r["us"] * 1e-6) / 1e9
        lines.append(
            f"| {r['tokens']} | {r['config']} | {r['rel_err']:.1e} | {r['bytes'] / 1e6:.1f} | {r['us']:.1f} "
            f"| {gbps:.0f} | {gbps * 1e9 / copy_bps:.2f} | {r['flops'] / (r['us'] * 1e-6) / 1e12:.1f} "
            f"| {r['floor_us']:.1f} | {r['us'] / r['floor_us']:.2f} | {r['align_us']:.1f} | {r['ref_us']:.0f} "
            f"| {r['ref_us'] / r['us']:.1f}x |")
    for r in rows:
        if "sweep" in r:
            lines.append(f"\nsweep T={r['tokens']} (us; x floor): " + ", ".join(
                f"{name} {v:.1f} ({v / r['floor_us']:.2f})" if isinstance(v, float) else f"{name} {v}"
                for name, v in r["sweep"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table to DIR/moe_kernel.md")
    parser.add_argument("--tokens", default="1,64", help="decode token counts, comma-separated")
    parser.add_argument("--prefill", default="4096", help="prefill token counts, comma-separated ('' for none)")
    parser.add_argument("--pairs", default="1,2,4,8,16", help="token counts of the few-token table ('' for none)")
    parser.add_argument("--sweep", action="store_true", help="also time every SWEEP_CONFIGS entry")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    layers = make_layers(gen)
    counts = [int(t) for t in f"{args.tokens},{args.prefill}".split(",") if t]
    rows = []
    for num_tokens in counts:
        rows.append(row(num_tokens, layers, gen, ceilings, args.sweep))
        print(rows[-1], flush=True)
    routers = make_routers(gen)
    few = []
    for num_tokens in [int(t) for t in args.pairs.split(",") if t]:
        few.append(pairs_row(num_tokens, layers, routers, gen, ceilings, args.sweep))
        print(few[-1], flush=True)
    report = table(rows, ceilings) + (pairs_table(few) if few else "")
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_kernel.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
