"""The FP8 decode GEMV's configs on one GPU: a table per matrix shape, the winner per shape class,
and a `GEMV_DEFAULTS` table to paste into engine/kernels/fp8_gemv.py.

    python benchmarks/fp8_gemv_sweep.py --out DIR [--name fp8_gemv_sweep] [--budget-s 200]

Matrices: the Llama-3-8B decode projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336) and Qwen3-30B-A3B's attention (qkv 5120x2048, o 2048x4096; its experts are
dequantized to bf16 at load and take the fused MoE kernel, not this GEMV), each in both scale
layouts (`row`: per-tensor/per-channel; `block`: 128 x 128 `weight_scale_inv`), at 1, 4 and 8 rows.
Every timing is a CUDA graph cycling through enough copies of the weight (>= 256 MiB) that none
is in L2 when read, as in a decode step; TB/s counts the FP8 bytes and the scales. Beside each
shape: the bf16 Triton GEMV on the same values (2 B per weight) and the FP8 GEMM path (activation
quantized, `torch._scaled_mm` or the block kernel), for scale. Candidates past `--budget-s` are
skipped (said in the report), so the run stays inside a device call.
Writes DIR/NAME.md and DIR/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine_timing import calls_ms, say
from pdserve.engine.kernels import fp8_gemm, fp8_gemv
from pdserve.engine.kernels.fp8_gemv import Fp8GemvConfig as C
from pdserve.engine.kernels.gemv import gemv

SHAPES = {
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "a3b qkv": (5120, 2048), "a3b o": (2048, 4096),
}
CANDIDATES = {  # rows -> configs; the current defaults are always timed too
    1: [C(4, 1024, 4, 2), C(4, 2048, 4, 2), C(8, 512, 4, 3), C(8, 1024, 4, 2), C(8, 1024, 4, 3),
        C(8, 2048, 4, 2), C(8, 2048, 8, 2), C(16, 512, 4, 3), C(16, 1024, 4, 2), C(16, 1024, 8, 2),
        C(16, 1024, 8, 3), C(32, 512, 8, 2), C(32, 1024, 8, 2),
        C(8, 1024, 4, 2, bit_dequant=True), C(8, 2048, 4, 2, bit_dequant=True), C(16, 1024, 4, 2, bit_dequant=True),
        C(16, 1024, 8, 2, bit_dequant=True), C(32, 512, 8, 2, bit_dequant=True),
        C(16, 512, 4, 2, use_dot=True), C(16, 1024, 4, 2, use_dot=True), C(32, 512, 4, 3, use_dot=True),
        C(64, 256, 4, 3, use_dot=True)],
    8: [C(16, 256, 4, 3, use_dot=True), C(16, 512, 4, 2, use_dot=True), C(32, 128, 4, 4, use_dot=True),
        C(32, 256, 4, 3, use_dot=True), C(32, 512, 4, 2, use_dot=True), C(64, 128, 4, 4, use_dot=True),
        C(64, 256, 4, 3, use_dot=True), C(64, 256, 8, 3, use_dot=True), C(8, 1024, 4, 2), C(16, 1024, 4, 2)],
}
CANDIDATES[4] = CANDIDATES[8]  # the m4 classes: the same tiles, FMA expected to win
BLOCK = 128
DEVICE = "cuda"
CYCLE_BYTES = 256 << 20


def weights(n: int, k: int, layout: str) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """Copies of an [n, k] FP8 weight with scales, (weight, scale, group_n, group_k), >= CYCLE_BYTES together."""
    copies = max(2, -(-CYCLE_BYTES // (n * k)))
    out = []
    for _ in range(copies):
        w = (torch.randn(n, k, device=DEVICE) * 64).to(fp8_gemm.FP8_DTYPE)
        if layout == "block":
            out.append((w, torch.rand(-(-n // BLOCK), -(-k // BLOCK), device=DEVICE) * 1e-3, BLOCK, BLOCK))
        else:
            out.append((w, torch.rand(n, 1, device=DEVICE) * 1e-3, 1, k))
    return out


def time_us(fn, ws) -> float:
    return calls_ms([lambda w=w: fn(*w) for w in ws]) * 1e3


def sweep_shape(n: int, k: int, layout: str, rows: int, deadline: float, skipped: list) -> dict:
    ws = weights(n, k, layout)
    nbytes = n * k + ws[0][1].numel() * 4
    x = torch.randn(rows, k, dtype=torch.bfloat16, device=DEVICE)
    default = fp8_gemv.default_config(rows, n, k, ws[0][3])
    configs = [default] + [c for c in CANDIDATES[rows] if c != default]
    results = {}
    for c in configs:
        if time.monotonic() > deadline and c != default:
            skipped.append(f"{layout} {n}x{k} M={rows} {c}")
            continue
        try:
            us = time_us(lambda w, s, gn, gk, c=c: fp8_gemv.fp8_gemv_triton(x, w, s, gn, gk, config=c), ws)
            results[str(c)] = dict(us=us, tbps=nbytes / (us * 1e-6) / 1e12)
        except Exception as e:  # a config the compiler refuses (registers, shared memory) is reported
            results[str(c)] = dict(error=f"{type(e).__name__}: {e}"[:160])
    extra = {"fp8 gemm (x quantized)": lambda w, s, gn, gk: fp8_gemm.fp8_matmul(x, w, s, gn, gk)}
    for label, fn in extra.items():
        us = time_us(fn, ws)
        results[label] = dict(us=us, tbps=nbytes / (us * 1e-6) / 1e12)
    dense = [fp8_gemm.dequantize(w, s, gn, gk).to(torch.bfloat16) for w, s, gn, gk in ws[:2]]
    dense = dense * max(1, -(-CYCLE_BYTES // (2 * n * k * len(dense))))
    us = calls_ms([lambda d=d: gemv(x, d) for d in dense]) * 1e3
    results["bf16 gemv (2 B/weight)"] = dict(us=us, tbps=2 * n * k / (us * 1e-6) / 1e12)
    del ws, dense
    torch.cuda.empty_cache()
    return dict(default=str(default), results=results)


def class_winners(table: dict) -> dict:
    """Per shape class: the config with the least total time over the class's shapes (timed on all of them)."""
    classes: dict[str, list[dict]] = {}
    for entry in table.values():
        classes.setdefault(entry["class"], []).append(entry["results"])
    winners = {}
    for key, shapes in classes.items():
        common = set.intersection(*({c for c, r in s.items() if "us" in r and "(" in c and "gemm" not in c
                                     and "bf16" not in c} for s in shapes))
        if common:
            best = min(common, key=lambda c: sum(s[c]["us"] for s in shapes))
            winners[key] = dict(config=best, total_us=sum(s[best]["us"] for s in shapes))
    return winners


def config_literal(text: str) -> str:
    """'fma-bits(8,1024,4,2)' -> 'C(8, 1024, 4, 2, bit_dequant=True)'."""
    variant, args = text.split("(")
    flag = {"fma": "", "fma-bits": ", bit_dequant=True", "dot": ", use_dot=True"}[variant]
    return f"C({args.rstrip(')').replace(',', ', ')}{flag})"


def report(results: dict, out_dir: Path, name: str) -> None:
    lines = [f"# FP8 GEMV sweep, {results['device']}, {results['date']}", "",
             "us per call (TB/s of FP8 weight + scale bytes); `*` the shape's best; `d` the current default.", ""]
    for label, entry in results["table"].items():
        ok = {c: r for c, r in entry["results"].items() if "us" in r and "(" in c}
        best = min(ok, key=lambda c: ok[c]["us"]) if ok else None
        lines.append(f"## {label} (class {entry['class']})")
        lines.append("")
        for c, r in sorted(entry["results"].items(), key=lambda kv: kv[1].get("us", 1e9)):
            mark = ("*" if c == best else "") + ("d" if c == entry["default"] else "")
            lines.append(f"- {mark} {c}: " + (f"{r['us']:.1f} us ({r['tbps']:.2f} TB/s)" if "us" in r else r["error"]))
        lines.append("")
    lines += ["## Winners per shape class (least total time over the class's shapes)", ""]
    for key, w in sorted(results["winners"].items()):
        lines.append(f"- {key}: {w['config']} ({w['total_us']:.1f} us total)")
    lines += ["", "Paste into engine/kernels/fp8_gemv.py (classes not swept keep their entries):", "", "```python"]
    lines += [f'    "{key}": {config_literal(w["config"])},' for key, w in sorted(results["winners"].items())]
    lines += ["```"]
    if results["skipped"]:
        lines += ["", f"Skipped past the budget: {len(results['skipped'])} timings, e.g. " + "; ".join(results["skipped"][:5])]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="fp8_gemv_sweep")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop timing candidates after this long")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    args = parser.parse_args()
    start = time.monotonic()
    results = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M"), table={}, skipped=[])
    for rows in (1, 4, 8):
        deadline = start + args.budget_s * {1: 0.5, 4: 0.75, 8: 1.0}[rows]  # one row is the case that matters most
        for layout in ("row", "block"):
            for shape in args.shapes.split(","):
                n, k = SHAPES[shape]
                label = f"{layout} {shape} [{n}, {k}] M={rows}"
                entry = sweep_shape(n, k, layout, rows, deadline, results["skipped"])
                entry["class"] = fp8_gemv.shape_class(rows, n, k, layout == "block")
                results["table"][label] = entry
                ok = {c: r for c, r in entry["results"].items() if "us" in r and "(" in c}
                best = min(ok, key=lambda c: ok[c]["us"])
                say(f"{label}: best {best} {ok[best]['us']:.1f} us ({ok[best]['tbps']:.2f} TB/s), default "
                    f"{entry['default']} {ok.get(entry['default'], {}).get('us', float('nan')):.1f} us")
    results["winners"] = class_winners(results["table"])
    report(results, args.out, args.name)


if __name__ == "__main__":
    sys.exit(main())
