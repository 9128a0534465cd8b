"""A mixture-of-experts MLP: each token through its top-k experts' SwiGLU, weighted and summed.

Shapes:

    x             [T, H]        bf16/fp16/fp32, last dim contiguous
    w13           [E, 2 * I, H] x's dtype; per expert the gate rows first, then the up rows
                                (the dense MLP's fused gate_up layout)
    w2            [E, H, I]     x's dtype (down_proj per expert)
    topk_weights  [T, k]        routing weights (any float dtype; used in fp32)
    topk_ids      [T, k]        expert of each (token, slot); distinct within a row, in [0, E)
    out           [T, H]        x's dtype

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

Numerics follow the dense MLP: each projection accumulates in fp32 and is rounded to
the dtype, silu_and_mul rounds like transformers; the weighted expert outputs are
summed in fp32 and rounded once.

GPU paths: a decode step of few tokens, whose pairs rarely share an expert (`is_sparse`),
runs pair-major in two launches (moe_decode.py: gate_up with silu_and_mul fused, then
down with the weighted sum over the slots). Otherwise five steps, none of which reads anything back to the host or sizes a
buffer by the routing (so a decode step's launches can be captured in a CUDA graph):

  1. align (one program for a decode step, two launches of one program per chunk of
     pairs beyond): the T * k (token, slot) pairs sorted by expert into
     `sorted_pairs`, each expert's run padded to a multiple of BLOCK_M with the
     sentinel T * k, and `block_expert`, the expert of each BLOCK_M-row block (-1 past
     the last used block). The buffers' length is a bound from T, k, E and BLOCK_M
     (`max_blocks`), so the grid does not depend on the routing; unused blocks exit
     at once, and only the touched experts' weights are read.
  2. grouped GEMM, w13: each program owns one block of rows (one expert) and BLOCK_N
     columns, gathers the rows of x its pairs come from, and writes gate_up[pair].
  3. silu_and_mul (activation.py) over the T * k rows (its Triton kernel on CUDA).
  4. grouped GEMM, w2: the same blocks, multiplied by each pair's routing weight,
     written to down[pair] (no atomics: the result does not depend on scheduling).
  5. out = down.view(T, k, H).sum(1), accumulated in fp32.

Block sizes are fixed per shape (`default_config`), never autotuned at run time
(CUDA graphs); `fused_moe_triton(..., config=...)` lets a benchmark sweep them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kernels._triton import tl, triton, use_triton
from pdserve.engine.kernels.activation import silu_and_mul
from pdserve.engine.kernels.moe_decode import moe_pairs_triton

# Pair-major (moe_decode.py) while T * k <= this fraction of E: pairs then rarely share an expert, so
# sorting them buys no weight reuse and costs three launches. benchmarks/moe_kernel.py times both
# paths at T = 1..16. Read at each call; 0 turns it off. Off: on the H200 (2026-12-01, Qwen3-30B-A3B's
# layer) the grouped path was faster at every T (T=1: 32.5 vs 39.4 us; T=8: 134 vs 161 us) with the
# pair kernels' untuned blocks; the benchmark's sweep says when they win.
SPARSE_PAIRS_PER_EXPERT = 0.0


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # (token, expert) rows per block; each expert's rows are padded to a multiple
    block_n: int  # output columns (weight rows) per program
    block_k: int  # reduction step
    group_m: int  # blocks that run side by side on each weight tile (L2 reuse when experts span blocks)
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        """e.g. moe(16,64,128,g1,4,4): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)."""
        return f"moe({self.block_m},{self.block_n},{self.block_k},g{self.group_m},{self.num_warps},{self.num_stages})"


def default_config(num_pairs: int, num_experts: int) -> MoeConfig:
    """Few rows per expert (decode): the smallest tensor-core tile, every weight tile read once and
    streamed with deep pipelining; many (prefill): larger tiles that reuse each loaded weight tile."""
    if num_pairs <= 16 * num_experts:
        return MoeConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    return MoeConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4)


# Candidates that benchmarks/moe_kernel.py times at each shape; default_config is chosen from them.
SWEEP_CONFIGS = (
    MoeConfig(16, 32, 256, 1, 4, 3),
    MoeConfig(16, 64, 128, 1, 4, 4),
    MoeConfig(16, 64, 256, 1, 4, 3),
    MoeConfig(16, 128, 128, 1, 4, 3),
    MoeConfig(16, 32, 128, 1, 2, 4),
    MoeConfig(32, 64, 128, 1, 4, 4),
    MoeConfig(64, 64, 64, 8, 4, 4),
    MoeConfig(64, 128, 64, 8, 4, 4),
    MoeConfig(128, 128, 64, 8, 8, 3),
)


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The MoE MLP; Triton on CUDA (pair-major or grouped, by `is_sparse`), the torch reference elsewhere."""
    if not use_triton(x, w13, w2, topk_weights, topk_ids):
        return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    if is_sparse(topk_ids.numel(), w13.shape[0]):
        _check_shapes(x, w13, w2, topk_weights, topk_ids)
        return moe_pairs_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)


def is_sparse(num_pairs: int, num_experts: int) -> bool:
    """Whether the pair-major path runs: few (token, slot) pairs for the experts there are."""
    return num_pairs <= SPARSE_PAIRS_PER_EXPERT * num_experts


def _check_shapes(x, w13, w2, topk_weights, topk_ids) -> None:
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    assert w13_hidden == hidden and two_inter % 2 == 0, f"w13 {tuple(w13.shape)} for x {tuple(x.shape)}"
    assert w2.shape == (num_experts, hidden, two_inter // 2), f"w2 {tuple(w2.shape)} for w13 {tuple(w13.shape)}"
    assert w13.dtype == x.dtype and w2.dtype == x.dtype, "weights in x's dtype"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == num_tokens
    assert topk_weights.is_floating_point() and not topk_ids.is_floating_point()


def fused_moe_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Plain torch, one expert at a time over the tokens routed to it (the CPU path and the oracle)."""
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        hidden = silu_and_mul(F.linear(x[tokens], w13[expert]))
        # down_proj accumulated in fp32 and weighted before its one rounding, like the kernel
        down = F.linear(hidden.float(), w2[expert].float()) * topk_weights[tokens, slots].float()[:, None]
        out.index_add_(0, tokens, down.to(x.dtype).float())
    return out.to(x.dtype)


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Launches the grouped path's kernels; works on any device Triton runs on (the interpreter included)."""
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1, "last dims contiguous"
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    config = config or default_config(num_pairs, num_experts)
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, config.block_m)
    weights = topk_weights.float().contiguous().view(-1)  # one per pair: pair = token * k + slot
    gate_up = torch.empty((num_pairs, two_inter), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, sorted_pairs, block_expert, top_k, None, config)
    hidden_act = silu_and_mul(gate_up)  # its own dispatcher: the reference on CPU tensors (interpreted tests)
    down = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden_act, w2, down, sorted_pairs, block_expert, 1, weights, config)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)  # fp32 accumulation inside the reduction


_ALIGN_TILE = 16 * 1024  # one-hot elements per align program: 32 a thread at _ALIGN_WARPS
_ALIGN_WARPS = 16


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Most BLOCK_M-row blocks any routing of num_pairs pairs over num_experts experts needs.

    Every used block holds at least one pair, and each expert's blocks but its last are full."""
    return min(num_pairs, num_pairs // block_m + min(num_experts, num_pairs))


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [max_blocks * block_m], block_expert [max_blocks]) for the grouped GEMMs.

    Pairs (token * k + slot) grouped by expert in increasing order, within an expert in pair
    order; each expert's run starts a block and is padded with the sentinel T * k. One program
    per `chunk` pairs (default: as many as a one-hot [chunk, E] tile of _ALIGN_TILE allows)."""
    num_pairs = topk_ids.numel()
    num_blocks = max_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    experts = triton.next_power_of_2(num_experts)
    chunk = chunk or max(16, min(triton.next_power_of_2(num_pairs), _ALIGN_TILE // experts))
    assert chunk & (chunk - 1) == 0, f"chunk {chunk} is not a power of two"
    num_chunks = triton.cdiv(num_pairs, chunk)
    counts = torch.empty((num_chunks, experts), dtype=torch.int32, device=device)  # per chunk and expert
    args = (topk_ids.contiguous().view(-1), counts, sorted_pairs, block_expert,
            num_pairs, num_experts, num_blocks, num_chunks)
    meta = dict(BLOCK_M=block_m, EXPERTS=experts, CHUNK=chunk, num_warps=_ALIGN_WARPS)
    if num_chunks == 1:  # decode: one launch
        _moe_align_kernel[(1,)](*args, COUNT=True, PLACE=True, **meta)
    else:  # every chunk's counts must be stored before any chunk is placed
        _moe_align_kernel[(num_chunks,)](*args, COUNT=True, PLACE=False, **meta)
        _moe_align_kernel[(num_chunks,)](*args, COUNT=False, PLACE=True, **meta)
    return sorted_pairs, block_expert


def _grouped_gemm(a, w, out, sorted_pairs, block_expert, rows_per_a, weights, config: MoeConfig) -> None:
    """out[pair] = a[pair // rows_per_a] @ w[expert].T (* weights[pair]) for every placed pair."""
    n, k = w.shape[1], w.shape[2]
    num_blocks = block_expert.numel()
    block_n = min(config.block_n, max(16, triton.next_power_of_2(n)))  # tiny shapes: no idle lanes
    block_k = min(config.block_k, max(16, triton.next_power_of_2(k)))
    grid = (num_blocks * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, sorted_pairs, block_expert, weights,
        out.shape[0], n, k, rows_per_a, num_blocks,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        MUL_WEIGHTS=weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        BLOCK_M=config.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


@triton.jit
def _moe_align_kernel(
    ids_ptr,  # [T * k] expert per pair
    counts_ptr,  # [num_chunks, EXPERTS] pairs per chunk and expert; unused by a single program
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M] out
    block_expert_ptr,  # [num_blocks] out
    num_pairs,
    num_experts,
    num_blocks,
    num_chunks,
    COUNT: tl.constexpr,  # store this chunk's counts and its share of the padding
    PLACE: tl.constexpr,  # write this chunk's pairs to their rows (both: the one program does all)
    BLOCK_M: tl.constexpr,
    EXPERTS: tl.constexpr,  # num_experts rounded up to a power of two
    CHUNK: tl.constexpr,  # pairs per program
):
    chunk = tl.program_id(0)
    columns = tl.arange(0, EXPERTS)
    # An id outside [0, E) matches no column, so it is never placed (and no weight past E is read).
    experts = tl.where(columns < num_experts, columns, -2)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, EXPERTS]
    if COUNT:
        if not PLACE:
            tl.store(counts_ptr + chunk * EXPERTS + columns, tl.sum(onehot, axis=0))
        _store_padding(sorted_pairs_ptr, num_blocks * BLOCK_M, num_pairs, chunk, num_chunks, CHUNK)
        _store_padding(block_expert_ptr, num_blocks, -1, chunk, num_chunks, CHUNK)
    if PLACE:
        if COUNT:
            total = tl.sum(onehot, axis=0)
            earlier = tl.zeros([EXPERTS], dtype=tl.int32)
            tl.debug_barrier()  # the padding is stored before the pairs overwrite some of it
        else:
            total, earlier = _counts_so_far(counts_ptr, chunk, num_chunks, EXPERTS, CHUNK)
        blocks = (total + BLOCK_M - 1) // BLOCK_M
        first_row = (tl.cumsum(blocks, axis=0) - blocks) * BLOCK_M + earlier  # this chunk's first row per expert
        rank = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
        dest = tl.sum(onehot * (first_row[None, :] + rank), axis=1)
        placed = tl.sum(onehot, axis=1) > 0
        tl.store(sorted_pairs_ptr + dest, pairs, mask=placed)
        tl.store(block_expert_ptr + dest // BLOCK_M, ids.to(tl.int32), mask=placed)  # every used block has a pair


@triton.jit
def _store_padding(ptr, length, value, chunk, num_chunks, CHUNK: tl.constexpr):
    """value into this program's share of ptr[:length]."""
    share = tl.cdiv(length, num_chunks)
    end = tl.minimum((chunk + 1) * share, length)
    for start in range(chunk * share, end, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(ptr + offs, tl.full([CHUNK], 0, tl.int32) + value, mask=offs < end)


@triton.jit
def _counts_so_far(counts_ptr, chunk, num_chunks, EXPERTS: tl.constexpr, ROWS: tl.constexpr):
    """(pairs per expert in all chunks, pairs per expert in the chunks before this one)."""
    columns = tl.arange(0, EXPERTS)
    total = tl.zeros([EXPERTS], dtype=tl.int32)
    earlier = tl.zeros([EXPERTS], dtype=tl.int32)
    for start in range(0, num_chunks, ROWS):
        rows = start + tl.arange(0, ROWS)
        counts = tl.load(counts_ptr + rows[:, None] * EXPERTS + columns[None, :], mask=(rows < num_chunks)[:, None], other=0)
        total += tl.sum(counts, axis=0)
        earlier += tl.sum(tl.where((rows < chunk)[:, None], counts, 0), axis=0)
    return total, earlier


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]; pair p reads row p // rows_per_a
    w_ptr,  # [E, N, K]
    out_ptr,  # [num_pairs, N]
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M]
    block_expert_ptr,  # [num_blocks]
    weights_ptr,  # [num_pairs] fp32; unused without MUL_WEIGHTS
    num_pairs,
    n,
    k,
    rows_per_a,
    num_blocks,
    stride_a,
    stride_we,
    stride_wn,
    stride_out,
    MUL_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # GROUP_M blocks walk the column tiles together, so a weight tile loaded for one block is
    # still in L2 for the next blocks of the same expert (prefill), and their rows of a too.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n, BLOCK_N)
    first_block = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % (GROUP_M * tiles_n)) % group_size
    tile_n = (pid % (GROUP_M * tiles_n)) // group_size
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # past the last used block: read nothing
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // rows_per_a).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        k_mask = start + offs_k < k
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if MUL_WEIGHTS:
        acc *= tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
