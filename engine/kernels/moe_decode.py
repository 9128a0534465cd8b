"""The MoE MLP for a few tokens: one (token, slot) pair per program, no sorting by expert.

Same contract and numerics as fused_moe.py (which dispatches here when pairs rarely
share an expert, see `fused_moe.is_sparse`):

    x [T, H], w13 [E, 2 * I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k] -> out [T, H]

When T * k is small against E (a decode step of few sequences) nearly every pair has
an expert of its own, so grouping pairs by expert buys nothing and costs launches:
the grouped path is align + w13 GEMM + silu_and_mul + w2 GEMM + sum, five launches of
a few microseconds each against ~18 us of weights per layer (Qwen3-30B-A3B, T = 1).
Here it is two:

  1. gate_up: grid (I / BLOCK_N tiles x T * k pairs, pairs fastest). Each program
     reads BLOCK_N gate rows and the matching BLOCK_N up rows of its pair's expert,
     dots them with its token's row of x (fp32 accumulation on the FMA units, as the
     decode GEMV does), rounds gate and up to the dtype, and writes
     silu(gate) * up rounded like activation.py: `act [T * k, I]`. Programs of the
     same tile run side by side, so two pairs that do share an expert read its tile
     once from HBM and once from L2.
  2. down: grid (H / BLOCK_N tiles x T tokens). Each program walks its token's k
     slots: w2[e] rows times act[pair] in fp32, times the routing weight, rounded to
     the dtype (the grouped path's `down[pair]`), summed in fp32 over the slots and
     rounded once. No atomics: the result does not depend on scheduling.

An id outside [0, E) contributes nothing (no weight past E is read). No buffer is
sized by the routing and nothing is read back: the launches can be captured in a
CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.kernels._triton import tl, triton
from pdserve.engine.kernels.partial_sums import load_width, partial_sums


@dataclass(frozen=True)
class PairConfig:
    gate_up_block_n: int  # intermediate columns per gate_up program (it reads twice as many rows)
    gate_up_block_k: int
    down_block_n: int  # output columns per down program
    down_block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        """e.g. pairs(8x512,4x256,4,3): gate_up (BLOCK_N x BLOCK_K), down (BLOCK_N x BLOCK_K), warps, stages."""
        return (f"pairs({self.gate_up_block_n}x{self.gate_up_block_k},{self.down_block_n}x{self.down_block_k},"
                f"{self.num_warps},{self.num_stages})")


DEFAULT_PAIR_CONFIG = PairConfig(8, 512, 4, 256)

# Candidates that benchmarks/moe_kernel.py times; DEFAULT_PAIR_CONFIG is chosen from them.
PAIR_SWEEP_CONFIGS = (
    PairConfig(8, 512, 4, 256),
    PairConfig(8, 512, 8, 256),
    PairConfig(16, 512, 8, 256),
    PairConfig(4, 512, 4, 256),
    PairConfig(8, 256, 4, 256, num_stages=4),
    PairConfig(8, 1024, 8, 512, num_stages=2),
    PairConfig(8, 512, 2, 512, num_warps=2),
    # smaller accumulators (2 x BLOCK_N x BLOCK_K fp32 in gate_up): more programs per SM
    PairConfig(4, 512, 4, 512),
    PairConfig(2, 1024, 4, 512),
    PairConfig(4, 1024, 4, 1024, num_stages=2),
    PairConfig(2, 512, 2, 512, num_warps=2),
    PairConfig(4, 256, 4, 256, num_stages=4),
    PairConfig(2, 2048, 4, 1024, num_warps=8, num_stages=2),
)


def moe_pairs_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: PairConfig | None = None,
) -> torch.Tensor:
    """Launches the two kernels (shapes checked by the caller); any device Triton runs on."""
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1, "last dims contiguous"
    config = config or DEFAULT_PAIR_CONFIG
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x)
    if num_pairs == 0:
        return out.zero_()
    ids = topk_ids.contiguous().view(-1)
    weights = topk_weights.float().contiguous().view(-1)
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    vec = load_width(w13)  # capped by each launch's BLOCK_K
    block_n, block_k = _tile(config.gate_up_block_n, config.gate_up_block_k, inter, hidden)
    _gate_up_kernel[(triton.cdiv(inter, block_n) * num_pairs,)](
        x, w13, act, ids, num_pairs, num_experts, inter, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, VEC=min(vec, block_k),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    block_n, block_k = _tile(config.down_block_n, config.down_block_k, hidden, inter)
    _down_kernel[(triton.cdiv(hidden, block_n) * num_tokens,)](
        act, w2, out, ids, weights, num_tokens, num_experts, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, VEC=min(vec, block_k),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _tile(block_n: int, block_k: int, n: int, k: int) -> tuple[int, int]:
    """The config's tile, shrunk for tiny shapes so no lane idles."""
    return min(block_n, triton.next_power_of_2(n)), min(block_k, max(16, triton.next_power_of_2(k)))


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2 * I, H]
    act_ptr,  # [T * k, I] out: silu(gate) * up
    ids_ptr,  # [T * k] expert per pair
    num_pairs,
    num_experts,
    inter,
    hidden,
    top_k,
    stride_x,
    stride_we,
    stride_wn,
    stride_act,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,  # products summed per VEC neighbours before accumulating (partial_sums.py)
):
    pid = tl.program_id(0)
    pair = pid % num_pairs  # pairs fastest: those sharing an expert load each tile together
    tile = pid // num_pairs
    expert = tl.load(ids_ptr + pair)
    is_expert = (expert >= 0) & (expert < num_experts)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = (cols < inter) & is_expert
    offs_k = tl.arange(0, BLOCK_K)
    gate_ptrs = (w13_ptr + tl.where(is_expert, expert, 0).to(tl.int64) * stride_we
                 + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :])  # [BLOCK_N, BLOCK_K]
    up_ptrs = gate_ptrs + inter * stride_wn
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_x + offs_k
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)  # per-thread partial sums, reduced once
    acc_up = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        k_mask = start + offs_k < hidden
        mask = row_mask[:, None] & k_mask[None, :]
        xv = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        gate_w = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up_w = tl.load(up_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc_gate += partial_sums(gate_w * xv, BLOCK_N, BLOCK_K, VEC)
        acc_up += partial_sums(up_w * xv, BLOCK_N, BLOCK_K, VEC)
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    dtype = act_ptr.dtype.element_ty
    gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)  # each projection rounded, as unfused
    up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)  # silu rounded, then the product (activation.py)
    tl.store(act_ptr + pair.to(tl.int64) * stride_act + cols, (act * up).to(dtype), mask=cols < inter)


@triton.jit
def _down_kernel(
    act_ptr,  # [T * k, I]
    w2_ptr,  # [E, H, I]
    out_ptr,  # [T, H]
    ids_ptr,  # [T * k]
    weights_ptr,  # [T * k] fp32
    num_tokens,
    num_experts,
    hidden,
    inter,
    stride_act,
    stride_we,
    stride_wn,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    token = pid % num_tokens
    cols = (pid // num_tokens) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    steps = tl.cdiv(inter, BLOCK_K)  # per slot
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    # One loop over (slot, K step), so the loads of the next slot's rows are pipelined too.
    for step in range(0, TOP_K * steps):
        slot = step // steps
        start = (step - slot * steps) * BLOCK_K
        pair = (token * TOP_K + slot).to(tl.int64)
        expert = tl.load(ids_ptr + pair)
        is_expert = (expert >= 0) & (expert < num_experts)
        k_mask = (start + offs_k < inter) & is_expert
        a = tl.load(act_ptr + pair * stride_act + start + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w_ptrs = (w2_ptr + tl.where(is_expert, expert, 0).to(tl.int64) * stride_we
                  + cols.to(tl.int64)[:, None] * stride_wn + start + offs_k[None, :])
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += partial_sums(w.to(tl.float32) * a[None, :], BLOCK_N, BLOCK_K, VEC)
        if start + BLOCK_K >= inter:  # the slot's last step: its weighted output, rounded like down[pair]
            down = tl.sum(acc, axis=1) * tl.load(weights_ptr + pair)
            total += down.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)
