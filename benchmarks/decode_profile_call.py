"""One device call's decode rows: the pair-major MoE sweep at one token, then decode_kernels.py's profile
with the MoE dispatch set by that sweep (pair-major with its best tile where it beats the grouped path).

    python benchmarks/decode_profile_call.py --out DIR [--models llama3-8b-fp8,qwen3-30b-a3b,llama3-8b]

Prints the sweep's choice; decode_kernels.py writes DIR/decode_kernels.md.
"""
from __future__ import annotations

import argparse
import sys

import torch

import decode_kernels
import moe_kernel
from engine_timing import say
from pdserve.engine.kernels import fused_moe, moe_decode


def choose_moe_dispatch() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers, routers = moe_kernel.make_layers(gen), moe_kernel.make_routers(gen)
    row = moe_kernel.pairs_row(1, layers, routers, gen, moe_kernel.measure_ceilings(), sweep=True)
    timed = {name: us for name, us in row["sweep"].items() if isinstance(us, float)}
    best = min(timed, key=timed.get)
    say(f"T=1: grouped {row['grouped_us']:.1f} us; pair tiles: " + ", ".join(f"{k} {v:.1f}" for k, v in timed.items()))
    if timed[best] < row["grouped_us"]:
        moe_decode.DEFAULT_PAIR_CONFIG = next(c for c in moe_decode.PAIR_SWEEP_CONFIGS if str(c) == best)
        fused_moe.SPARSE_PAIRS_PER_EXPERT = moe_kernel.TOP_K / moe_kernel.EXPERTS  # one token's pairs
    say(f"MoE dispatch for the profile: pairs while T*k <= {fused_moe.SPARSE_PAIRS_PER_EXPERT} E, "
        f"tile {moe_decode.DEFAULT_PAIR_CONFIG} (best {best} {timed[best]:.1f} us)")
    del layers, routers
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="llama3-8b-fp8,qwen3-30b-a3b,llama3-8b")
    args = parser.parse_args()
    choose_moe_dispatch()
    sys.argv = ["decode_kernels.py", "--out", args.out, "--models", args.models, "--batches", "1"]
    decode_kernels.main()


if __name__ == "__main__":
    main()
