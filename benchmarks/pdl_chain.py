"""What programmatic dependent launch (PDL) saves per kernel boundary inside a CUDA graph, on this GPU.

    python benchmarks/pdl_chain.py [--rows 4096] [--cols 4096] [--kernels 64]

A chain of bf16 GEMVs y_{i+1} = W_i @ y_i (each weight its own, so none stays in L2), captured in one
CUDA graph five ways: plain launches; PDL launches that wait for the previous kernel before any load, or
that load their first weight tile before waiting (weights never depend on the previous kernel); each
letting the next kernel launch early (right after the wait) or as its programs exit. Prints us per
GEMV and TB/s, and checks the variants agree. H200, 2026-12-02 (plain, wait, wait+prefetch, all early):
10.73 / 12.43 / 12.53 us per 32 MiB GEMV: early PDL lost 1.7 us a kernel.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _chain_gemv(x_ptr, w_ptr, out_ptr, k, scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PDL: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * k + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    start = 0
    if PREFETCH:  # the weight is not the previous kernel's output: read it before waiting
        w = tl.load(w_ptrs)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if EARLY:  # let the next kernel's programs launch now (else: as each of these exits)
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:
        acc += w.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
        start = BLOCK_K
    for s in range(start, k, BLOCK_K):
        w = tl.load(w_ptrs + s)
        acc += w.to(tl.float32) * tl.load(x_ptr + s + cols).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows, (y * scale).to(out_ptr.dtype.element_ty))  # 1/sqrt(k): the chain keeps its scale


def chain(weights, x, outs, pdl: bool, prefetch: bool, early: bool):
    for w, out in zip(weights, outs):
        kwargs = {"launch_pdl": True} if pdl else {}
        _chain_gemv[(w.shape[0] // 8,)](x, w, out, w.shape[1], w.shape[1] ** -0.5, BLOCK_N=8, BLOCK_K=512, PDL=pdl,
                                        PREFETCH=prefetch, EARLY=early, num_warps=4, num_stages=3, **kwargs)
        x = out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--kernels", type=int, default=64)
    args = parser.parse_args()
    assert args.rows == args.cols, "a chain feeds each output to the next GEMV"
    weights = [torch.randn(args.rows, args.cols, device="cuda", dtype=torch.bfloat16) for _ in range(args.kernels)]
    x = torch.randn(args.cols, device="cuda", dtype=torch.bfloat16)
    results = {}
    variants = (("plain", False, False, False), ("pdl, next launched at exit", True, False, False),
                ("pdl, next launched early", True, False, True), ("pdl+prefetch, at exit", True, True, False),
                ("pdl+prefetch, early", True, True, True))
    for name, pdl, prefetch, early in variants:
        outs = [torch.empty(args.rows, device="cuda", dtype=torch.bfloat16) for _ in weights]
        chain(weights, x, outs, pdl, prefetch, early)  # compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(weights, x, outs, pdl, prefetch, early)
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / 20 / args.kernels
        results[name] = (us, outs[-1].float().clone())
        tbps = args.rows * args.cols * 2 / (us * 1e-6) / 1e12
        print(f"| {name} | {us:.2f} us per GEMV | {tbps:.2f} TB/s |", flush=True)
    ref = results["plain"][1]
    for name, (_, out) in results.items():
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"{name}: rel. err vs plain {err:.1e}")
        assert err < 1e-2, name


if __name__ == "__main__":
    main()
