"""fused_moe: the Triton path (interpreted) against the torch reference and a per-token loop."""
import pytest
import torch
import torch.nn.functional as F

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels.fused_moe import (
    MoeConfig,
    default_config,
    fused_moe,
    fused_moe_reference,
    fused_moe_triton,
    max_blocks,
    moe_align,
)

TOLERANCE = {**TOLERANCE, torch.float16: 1e-2}
DECODE = MoeConfig(block_m=16, block_n=16, block_k=32, group_m=1, num_warps=2, num_stages=2)
PREFILL = MoeConfig(block_m=32, block_n=32, block_k=16, group_m=4, num_warps=2, num_stages=2)


def routing(num_tokens, num_experts, top_k, gen, experts_used=None):
    """Distinct experts per token, softmax-like weights; experts_used limits the choice (idle experts).
    The ids are a column slice, not contiguous, as a caller's may be."""
    pool = experts_used or num_experts
    ids = torch.rand(num_tokens, pool, generator=gen).argsort(dim=-1)[:, :top_k]
    weights = torch.rand(num_tokens, top_k, generator=gen).softmax(dim=-1)
    return weights, ids


def make_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed=0, experts_used=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    weights, ids = routing(num_tokens, num_experts, top_k, gen, experts_used)
    return [t.to(DEVICE, dtype) for t in (x, w13, w2)] + [weights.to(DEVICE), ids.to(DEVICE)]


def per_token_loop(x, w13, w2, topk_weights, topk_ids):
    """The definition, one (token, slot) at a time in float64 on the same (rounded) inputs."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate = w13[e, :inter].double().cpu() @ x[t].double().cpu()
            up = w13[e, inter:].double().cpu() @ x[t].double().cpu()
            out[t] += float(topk_weights[t, j]) * (w2[e].double().cpu() @ (F.silu(gate) * up))
    return out


@requires_triton
@pytest.mark.parametrize("config", [None, PREFILL], ids=["default", "prefill"])
@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (8, 2), (16, 8)])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_matches_reference_float32(num_tokens, num_experts, top_k, config):
    inputs = make_inputs(num_tokens, 32, 16, num_experts, top_k, torch.float32)
    out = fused_moe_triton(*inputs, config=config)
    assert out.shape == (num_tokens, 32) and out.dtype == torch.float32
    assert relative_error(out, fused_moe_reference(*inputs)) < TOLERANCE[torch.float32]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens, config", [(3, DECODE), (64, PREFILL)])
def test_half_precision_matches_reference(num_tokens, config, dtype):
    inputs = make_inputs(num_tokens, 48, 40, 8, 2, dtype)  # 48, 40: partial tiles in N and K
    inputs[4] = inputs[4].int()  # int32 ids work as well as topk's int64
    out = fused_moe_triton(*inputs, config=config)
    assert out.dtype == dtype
    assert relative_error(out, fused_moe_reference(*inputs)) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("num_tokens, config", [(3, DECODE), (64, PREFILL)])
def test_matches_per_token_loop(num_tokens, config):
    """Partial tiles (hidden 40, intermediate 24), and half the experts idle."""
    inputs = make_inputs(num_tokens, 40, 24, 8, 2, torch.float32, seed=1, experts_used=4)
    expected = per_token_loop(*inputs)
    assert relative_error(fused_moe_triton(*inputs, config=config).cpu(), expected) < TOLERANCE[torch.float32]
    assert relative_error(fused_moe_reference(*inputs).cpu(), expected) < TOLERANCE[torch.float32]


@requires_triton
@pytest.mark.parametrize("chunked", [False, True], ids=["one-program", "chunks"])
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 2), (64, 16, 8), (20, 8, 2)])
def test_align_groups_pairs_by_expert(num_tokens, num_experts, top_k, block_m, chunked):
    chunk = (16 if num_tokens * top_k < 100 else 128) if chunked else None  # 40 and 512 pairs: 3 and 4 chunks
    gen = torch.Generator().manual_seed(2)
    _, ids = routing(num_tokens, num_experts, top_k, gen, experts_used=max(top_k, num_experts // 2))
    sorted_pairs, block_expert = moe_align(ids.to(DEVICE), num_experts, block_m, chunk=chunk)
    sorted_pairs, block_expert, flat = sorted_pairs.cpu().long(), block_expert.cpu().long(), ids.flatten()
    num_pairs = flat.numel()
    assert block_expert.numel() == max_blocks(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)
    used = int(((counts + block_m - 1) // block_m).sum())
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    assert (block_expert[:used].diff() >= 0).all(), "blocks in expert order"
    real = sorted_pairs < num_pairs
    assert torch.equal(sorted_pairs[real].sort().values, torch.arange(num_pairs)), "every pair once"
    assert (sorted_pairs[~real] == num_pairs).all() and not real[used * block_m:].any()
    rows_expert = block_expert.repeat_interleave(block_m)
    assert torch.equal(flat[sorted_pairs[real]], rows_expert[real]), "each pair in a block of its expert"


@requires_triton
def test_align_in_chunks_end_to_end(monkeypatch):
    """A one-hot tile of 16 x 8: the 64 x 2 pairs are sorted by eight programs, in two launches."""
    import pdserve.engine.kernels.fused_moe as module

    monkeypatch.setattr(module, "_ALIGN_TILE", 16 * 8)
    inputs = make_inputs(64, 32, 16, 8, 2, torch.float32, seed=3)
    assert relative_error(fused_moe_triton(*inputs, config=PREFILL), fused_moe_reference(*inputs)) < 1e-5


@requires_triton
def test_single_expert_for_every_token():
    """All pairs on one expert: a run of several blocks, the other experts idle."""
    inputs = make_inputs(40, 32, 16, 6, 1, torch.float32)
    inputs[4] = torch.full_like(inputs[4], 5)
    out = fused_moe_triton(*inputs, config=DECODE)
    assert relative_error(out, fused_moe_reference(*inputs)) < TOLERANCE[torch.float32]


def test_reference_matches_per_token_loop():
    inputs = make_inputs(5, 32, 24, 6, 3, torch.float32)
    assert relative_error(fused_moe_reference(*inputs).cpu(), per_token_loop(*inputs)) < 1e-6


def test_default_config_by_rows_per_expert():
    assert default_config(8, 128).block_m == 16  # decode: one token, k = 8
    assert default_config(512, 128).block_m == 16  # decode batch 64
    assert default_config(32768, 128).block_m > 16  # prefill


def test_dispatcher_uses_reference_on_cpu():
    inputs = [t.cpu() for t in make_inputs(3, 32, 16, 4, 2, torch.float32)]
    assert torch.equal(fused_moe(*inputs), fused_moe_reference(*inputs))


@requires_triton
def test_align_never_places_an_id_out_of_range():
    """E = 6 pads to 8 columns inside the kernel: ids 6, 7 and -1 must not land in a block."""
    ids = torch.tensor([[0, 6], [7, 1], [-1, 0]], device=DEVICE)
    sorted_pairs, block_expert = moe_align(ids, 6, 16)
    assert sorted(sorted_pairs[sorted_pairs < 6].tolist()) == [0, 3, 5]
    assert block_expert.tolist()[:2] == [0, 1] and (block_expert[2:] == -1).all()
    sorted_pairs, block_expert = moe_align(ids, 6, 16, chunk=2)
    assert sorted(sorted_pairs[sorted_pairs < 6].tolist()) == [0, 3, 5] and (block_expert[2:] == -1).all()
