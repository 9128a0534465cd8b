"""An MoE router's top-k: softmax over the experts in fp32, the k largest, optionally renormalised.

Shapes:

    logits   [T, E]   the router projection's output, any float dtype (read as fp32)
    weights  [T, k]   fp32, in descending order per row
    ids      [T, k]   int32 expert of each slot, distinct within a row

    p = softmax(logits.float());  weights, ids = topk(p, k);  weights /= weights.sum() if renormalize

That is Qwen3-MoE's and Mixtral's routing (transformers: softmax in fp32 over all
experts, then topk, then `norm_topk_prob`); renormalised, it equals a softmax over
the k largest logits. Equal probabilities go to the lower expert id.
GPU path: one program per token, the whole row of E logits in registers, k rounds
of (max, lowest index holding it): one launch where torch takes five (cast,
softmax, topk, sum, divide), which at a decode step's size cost a launch each.
"""
from __future__ import annotations

import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], ids int32 [T, k]); Triton on CUDA, torch elsewhere."""
    if use_triton(logits):
        return route_triton(logits, top_k, renormalize)
    return route_reference(logits, top_k, renormalize)


def route_reference(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def route_triton(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel; works on any device Triton runs on (the interpreter included)."""
    num_tokens, num_experts = logits.shape
    assert 1 <= top_k <= num_experts, f"top_k {top_k} of {num_experts} experts"
    assert logits.stride(-1) == 1, "experts contiguous"
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    experts = triton.next_power_of_2(num_experts)
    _route_kernel[(num_tokens,)](
        logits, weights, ids, num_experts, logits.stride(0),
        TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), EXPERTS=experts, RENORMALIZE=renormalize,
        num_warps=1 if experts <= 256 else 4,  # a 128-wide row is four values a lane of one warp
    )
    return weights, ids


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E]
    weights_ptr,  # [T, TOP_K] fp32 out
    ids_ptr,  # [T, TOP_K] int32 out
    num_experts,
    stride_logits,
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    EXPERTS: tl.constexpr,  # num_experts rounded up to a power of two
    RENORMALIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, EXPERTS)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_logits + experts, mask=valid, other=float("-inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, axis=0))  # padding: exp(-inf) = 0
    probs = exps / tl.sum(exps, axis=0)
    remaining = tl.where(valid, probs, -1.0)  # below every probability: padding is never picked
    slots = tl.arange(0, SLOTS)
    weights = tl.zeros([SLOTS], dtype=tl.float32)
    ids = tl.zeros([SLOTS], dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=0)
        best_id = tl.min(tl.where(remaining == best, experts, EXPERTS), axis=0)  # ties: the lower id
        weights = tl.where(slots == slot, best, weights)
        ids = tl.where(slots == slot, best_id, ids)
        remaining = tl.where(experts == best_id, -2.0, remaining)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)  # unused slots hold 0
    out = token * TOP_K + slots
    tl.store(weights_ptr + out, weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids, mask=slots < TOP_K)


def route_grouped(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                  renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's and GLM-4.5's routing: (weights fp32 [T, k], ids int32 [T, k]).

    Sigmoid scores; the experts are chosen by score + `bias` (the checkpoint's
    e_score_correction_bias: it balances the load, and never weighs an output) among the
    `topk_groups` groups of experts whose two best biased scores sum highest; each chosen
    expert is weighed by its unbiased score, renormalised over the k, times `scaling`
    (routed_scaling_factor). In torch on every device: a handful of launches a layer."""
    scores = logits.float().sigmoid()
    choice = scores if bias is None else scores + bias
    if num_groups > 1:
        tokens, experts = choice.shape
        best_two = choice.view(tokens, num_groups, experts // num_groups).topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(best_two, dtype=torch.bool).scatter_(1, best_two.topk(topk_groups, dim=-1).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(experts // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)
