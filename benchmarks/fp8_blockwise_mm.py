"""Is cuBLASLt's block-scaled FP8 GEMM (`torch._scaled_mm`, 1x128 activation scales, 128x128 weight
scales) right and faster than our Triton kernel for 128 x 128 `weight_scale_inv` checkpoints?

    python benchmarks/fp8_blockwise_mm.py [--rows 64,512,2048,4096]

The Llama-3-8B projections (benchmarks/fp8_gemm_sweep.py's), the activation already quantized. Per
row count and matrix: each path's relative error against `fp8_matmul_reference` (fp32, the same
quantized operands), and its time (a CUDA graph over two copies of the weight); cuBLAS's rowwise FP8
and bf16 beside them. Prints a table per row count.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine_timing import calls_ms, rel_err, say
from fp8_gemm_sweep import SHAPES, operands
from pdserve.engine.kernels import fp8_gemm


def blockwise_mm(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's layouts: the activation's scales outer-dim-major ([M, K/128], stride (1, M)), the
    weight's [N/128, K/128] row-major, passed transposed beside the transposed weight."""
    return fp8_gemm.blockwise_scaled_mm(q, x_scale.t().contiguous().t(), weight, w_scale, torch.bfloat16)


def study(rows: int) -> None:
    say(f"\n## {rows} rows: us (TFLOP/s) and relative error against the fp32 reference\n")
    say("| matrix | cuBLAS block-scaled | Triton block-scaled | cuBLAS rowwise FP8 | bf16 |")
    say("|---|---|---|---|---|")
    totals = [0.0] * 4
    for name, (n, k) in SHAPES.items():
        x, q, x_scale, weights = operands(rows, n, k)
        w, s = weights[0]
        reference = fp8_gemm.fp8_matmul_reference(x, w, s, 128, 128).float()
        cells = []
        paths = [
            lambda w, s: blockwise_mm(q, x_scale, w, s),
            lambda w, s: fp8_gemm.fp8_gemm_triton(q, x_scale, w, s, 128, 128, None, torch.bfloat16),
        ]
        for i, path in enumerate(paths):
            try:
                err = rel_err(path(w, s).float(), reference)
                us = 1e3 * calls_ms([lambda w=w, s=s: path(w, s) for w, s in weights])
            except Exception as e:  # a layout cuBLASLt refuses
                cells.append(f"{type(e).__name__}: {str(e)[:90]}")
                totals[i] = float("nan")
                continue
            totals[i] += us
            cells.append(f"{us:.1f} ({2 * rows * n * k / (us * 1e-6) / 1e12:.0f}), err {err:.1e}")
        row_q, row_scale = fp8_gemm.quantize_activation(x, k, None)
        per_row = [(w, torch.full((1, n), 1e-3, device="cuda")) for w, _ in weights]
        us = 1e3 * calls_ms([lambda w=w, s=s: torch._scaled_mm(row_q, w.t(), scale_a=row_scale, scale_b=s,
                                                                out_dtype=torch.bfloat16) for w, s in per_row])
        totals[2] += us
        cells.append(f"{us:.1f} ({2 * rows * n * k / (us * 1e-6) / 1e12:.0f})")
        dense = [w.to(torch.bfloat16) for w, _ in weights]
        us = 1e3 * calls_ms([lambda d=d: F.linear(x, d) for d in dense])
        totals[3] += us
        cells.append(f"{us:.1f} ({2 * rows * n * k / (us * 1e-6) / 1e12:.0f})")
        say(f"| {name} | " + " | ".join(cells) + " |")
        del weights, per_row, dense
        torch.cuda.empty_cache()
    say("| total us | " + " | ".join(f"{t:.1f}" for t in totals) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="64,512,2048,4096")
    args = parser.parse_args()
    say(f"# cuBLASLt block-scaled FP8 against the Triton kernel, {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    for rows in (int(r) for r in args.rows.split(",")):
        study(rows)


if __name__ == "__main__":
    main()
