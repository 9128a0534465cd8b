"""Why the decode GEMV streams at ~2.4-3.2 TB/s, not the copy rate: kernel structures timed side by side.

    python benchmarks/gemv_variants.py --out DIR [--budget-s 200]

One row of x, the decode matrices of Llama-3-8B and Qwen3-30B-A3B's attention, FP8 (per-channel
scales) and bf16 weights. Each variant is the engine's FMA GEMV stripped to M = 1 and even shapes,
changed in one respect:

  * `base`: the engine's structure, an fp32 [BLOCK_N, BLOCK_K] accumulator reduced once at the end;
  * `vec`: each step's products summed within each thread's VEC contiguous elements first, so the
    accumulator is VEC times smaller (fewer registers: more programs per SM, more bytes in flight);
    this lets BLOCK_K grow to 4096 without the accumulator growing;
  * `cg`: the weight loaded with `.cg` (L2 only; it is read once);
  * `persist`: a grid of at most PROGRAMS_PER_SM x SMs programs walking the tiles (no tail wave).

Every timing is a CUDA graph over enough weight copies (>= 256 MiB) that none sits in L2. Also timed:
the engine's kernel at its default config, for scale. Each variant is checked against torch first.
Writes DIR/gemv_variants.md.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine_timing import calls_ms, say
from pdserve.engine.kernels import fp8_gemv
from pdserve.engine.kernels.gemv import gemv_triton

SHAPES = {"8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
          "a3b qkv": (5120, 2048), "a3b o": (2048, 4096)}
CYCLE_BYTES = 256 << 20
DEVICE = "cuda"


@dataclass(frozen=True)
class Variant:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    vec: int = 1  # products summed per VEC contiguous elements before accumulating (1: the base structure)
    cg: bool = False
    persist: int = 0  # programs per SM of a persistent grid (0: one program per tile)

    def __str__(self) -> str:
        tags = [f"vec{self.vec}"] * (self.vec > 1) + ["cg"] * self.cg + [f"persist{self.persist}"] * (self.persist > 0)
        return f"{'+'.join(tags) or 'base'}({self.block_n},{self.block_k},{self.num_warps},{self.num_stages})"


@triton.jit
def _variant_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, k, num_tiles,
                    FP8: tl.constexpr, VEC: tl.constexpr, CACHE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * k + offs_k[None, :]
        x_ptrs = x_ptr + offs_k
        if VEC > 1:
            acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            w = tl.load(w_ptrs, cache_modifier=CACHE)
            if FP8:
                wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                wf = w.to(tl.float32)
            p = wf * tl.load(x_ptrs).to(tl.float32)[None, :]
            if VEC > 1:
                acc += tl.sum(tl.reshape(p, [BLOCK_N, BLOCK_K // VEC, VEC]), axis=2)
            else:
                acc += p
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if FP8:
            y = y * tl.load(scale_ptr + cols)
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty))


def run_variant(v: Variant, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, sms: int) -> torch.Tensor:
    n, k = w.shape
    assert n % v.block_n == 0 and k % v.block_k == 0
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    tiles = n // v.block_n
    grid = (min(tiles, v.persist * sms) if v.persist else tiles,)
    fp8 = scale is not None
    _variant_kernel[grid](x, w.view(torch.uint8) if fp8 else w, scale if fp8 else w, out, k, tiles,
                          FP8=fp8, VEC=v.vec, CACHE=".cg" if v.cg else "", BLOCK_N=v.block_n, BLOCK_K=v.block_k,
                          num_warps=v.num_warps, num_stages=v.num_stages)
    return out


def variants(fp8: bool) -> list[Variant]:
    vec = 16 if fp8 else 8  # one 16-byte load's elements
    out = [Variant(4, 1024, 4, 2), Variant(8, 512, 4, 3), Variant(4, 1024, 4, 2, cg=True)]
    for bn, bk, warps, stages in itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8), (1, 3)):
        if bn * bk <= 16384:  # the weight tile within 128 registers a thread at 4 warps
            out.append(Variant(bn, bk, warps, stages, vec=vec))
    out += [Variant(4, 2048, 4, 2, vec=vec, cg=True), Variant(4, 2048, 4, 2, vec=vec, persist=4),
            Variant(4, 2048, 4, 2, vec=vec, persist=8), Variant(4, 1024, 4, 2, persist=8)]
    return out


def time_shape(name: str, n: int, k: int, fp8: bool, sms: int, deadline: float) -> list[tuple[str, float, float]]:
    copies = max(2, -(-CYCLE_BYTES // (n * k * (1 if fp8 else 2))))
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    if fp8:
        ws = [(torch.randn(n, k, device=DEVICE) * 64).to(torch.float8_e4m3fn) for _ in range(copies)]
        scales = [torch.rand(n, device=DEVICE) * 1e-3 for _ in range(copies)]
    else:
        ws = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        scales = [None] * copies
    nbytes = n * k * (1 if fp8 else 2)
    ref = (x.float() @ (ws[0].float() * (scales[0][:, None] if fp8 else 1)).T)
    rows = []
    if fp8:
        engine = lambda w, s: fp8_gemv.fp8_gemv_triton(x, w, s.view(n, 1), 1, k)
    else:
        engine = lambda w, s: gemv_triton(x, w)
    us = calls_ms([lambda w=w, s=s: engine(w, s) for w, s in zip(ws, scales)]) * 1e3
    rows.append(("engine default", us, nbytes / us / 1e6))
    for v in variants(fp8):
        if time.monotonic() > deadline:
            rows.append((str(v), float("nan"), float("nan")))
            continue
        if n % v.block_n or k % v.block_k:
            continue
        try:
            got = run_variant(v, x, ws[0], scales[0], sms).float()
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                rows.append((f"{v} WRONG (rel err {err:.3g})", float("nan"), float("nan")))
                continue
            us = calls_ms([lambda w=w, s=s: run_variant(v, x, w, s, sms) for w, s in zip(ws, scales)]) * 1e3
            rows.append((str(v), us, nbytes / us / 1e6))
        except Exception as e:  # a config the compiler refuses
            rows.append((f"{v} failed: {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan")))
    del ws
    torch.cuda.empty_cache()
    best = min((r for r in rows if r[1] == r[1]), key=lambda r: r[1])
    say(f"{'fp8' if fp8 else 'bf16'} {name}: best {best[0]} {best[1]:.1f} us ({best[2]:.2f} TB/s); engine {rows[0][1]:.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    deadline = time.monotonic() + args.budget_s
    lines = [f"# GEMV structures at one row, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "us per call, TB/s of weight bytes; sorted, fastest first. nan: skipped past the budget.", ""]
    names = args.shapes.split(",")
    # the FP8 8B matrices and the A3B attention first: the rows the issues' targets hang on
    order = [(True, s) for s in names if s.startswith("8b")] + [(False, s) for s in names if s.startswith("a3b")]
    order += [(False, s) for s in names if s.startswith("8b")] + [(True, s) for s in names if s.startswith("a3b")]
    for fp8, name in order:
        n, k = SHAPES[name]
        rows = time_shape(name, n, k, fp8, sms, deadline)
        lines += [f"## {'fp8' if fp8 else 'bf16'} {name} [{n}, {k}]", "", "| variant | us | TB/s |", "|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} |" for r in sorted(rows, key=lambda r: (r[1] != r[1], r[1]))]
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
