"""The block-scaled FP8 GEMM's tile configs on one GPU (the prefill and large-batch path of 128 x 128
`weight_scale_inv` checkpoints: Qwen3-FP8, DeepSeek), beside cuBLAS's per-tensor FP8 GEMM and bf16.

    python benchmarks/fp8_gemm_sweep.py [--rows 64,2048] [--budget-s 150]

Matrices: the Llama-3-8B projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down
4096x14336); the activation already quantized (the GEMM alone). Each timing is a CUDA graph over two
copies of the weight. Prints a table per row count (us and TFLOP/s per config and matrix, the total),
the current default marked, and the config with the least total time.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from engine_timing import calls_ms, say
from pdserve.engine.kernels import fp8_gemm
from pdserve.engine.kernels.fp8_gemm import Fp8GemmConfig as G

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CANDIDATES = {  # (block_m, block_n, block_k, warps, stages)
    "small": [G(64, 128, 128, 4, 3), G(64, 64, 128, 4, 4), G(64, 128, 128, 4, 4), G(64, 256, 128, 8, 3),
              G(32, 128, 128, 4, 4), G(64, 128, 128, 8, 3)],
    "large": [G(128, 128, 128, 8, 3), G(128, 128, 128, 8, 4), G(128, 256, 128, 8, 3), G(256, 128, 128, 8, 3),
              G(128, 128, 128, 4, 3), G(128, 64, 128, 4, 4), G(64, 128, 128, 4, 4)],
}


def operands(rows: int, n: int, k: int):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    q, x_scale = fp8_gemm.quantize_activation(x, 128, None)
    weights = [((torch.randn(n, k, device="cuda") * 64).to(fp8_gemm.FP8_DTYPE),
                torch.rand(-(-n // 128), -(-k // 128), device="cuda") * 1e-3) for _ in range(2)]
    return x, q, x_scale, weights


def sweep(rows: int, deadline: float) -> dict[str, dict[str, float]]:
    """{config or baseline: {matrix: us}}."""
    key = "small" if rows <= 64 else "large"
    default = fp8_gemm.default_gemm_config(rows, 4096, 128)
    configs = [default] + [c for c in CANDIDATES[key] if c != default]
    table: dict[str, dict[str, float]] = {}
    for name, (n, k) in SHAPES.items():
        x, q, x_scale, weights = operands(rows, n, k)
        for c in configs:
            if time.monotonic() > deadline and c != default:
                continue
            try:
                us = 1e3 * calls_ms([lambda w=w, s=s, c=c: fp8_gemm.fp8_gemm_triton(
                    q, x_scale, w, s, 128, 128, None, torch.bfloat16, c) for w, s in weights])
            except Exception as e:  # a config the compiler refuses (registers, shared memory)
                say(f"{c} on {name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            table.setdefault(str(c), {})[name] = us
        per_tensor = [(w, torch.full((n, 1), 1e-3, device="cuda")) for w, _ in weights]
        row_q, row_scale = fp8_gemm.quantize_activation(x, k, None)
        table.setdefault("cuBLAS per-tensor FP8 (_scaled_mm)", {})[name] = 1e3 * calls_ms([
            lambda w=w, s=s: torch._scaled_mm(row_q, w.t(), scale_a=row_scale, scale_b=s.view(1, -1),
                                              out_dtype=torch.bfloat16) for w, s in per_tensor])
        dense = [w.to(torch.bfloat16) for w, _ in weights]
        table.setdefault("bf16 F.linear", {})[name] = 1e3 * calls_ms([lambda d=d: F.linear(x, d) for d in dense])
        del weights, per_tensor, dense
        torch.cuda.empty_cache()
    return table


def report(rows: int, table: dict[str, dict[str, float]]) -> None:
    default = str(fp8_gemm.default_gemm_config(rows, 4096, 128))
    say(f"\n## {rows} rows (TFLOP/s in brackets; d: the current default)\n")
    say("| config | " + " | ".join(SHAPES) + " | total us |")
    say("|---|" + "---|" * (len(SHAPES) + 1))
    full = {c: t for c, t in table.items() if len(t) == len(SHAPES)}
    for c, t in sorted(full.items(), key=lambda ct: sum(ct[1].values())):
        cells = [f"{t[m]:.1f} ({2 * rows * n * k / (t[m] * 1e-6) / 1e12:.0f})" for m, (n, k) in SHAPES.items()]
        say(f"| {'d ' if c == default else ''}{c} | " + " | ".join(cells) + f" | {sum(t.values()):.1f} |")
    kernels = {c: t for c, t in full.items() if c.startswith("tile(")}
    if kernels:
        say(f"\nbest block-scaled config at {rows} rows: {min(kernels, key=lambda c: sum(kernels[c].values()))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="64,2048")
    parser.add_argument("--budget-s", type=float, default=150)
    args = parser.parse_args()
    say(f"# Block-scaled FP8 GEMM sweep, {torch.cuda.get_device_name(0)}")
    deadline = time.monotonic() + args.budget_s
    for rows in (int(r) for r in args.rows.split(",")):
        report(rows, sweep(rows, deadline))


if __name__ == "__main__":
    main()
