"""The pair-major MoE path (moe_decode.py, interpreted) and the routing kernel against torch."""
import pytest
import torch

from kernel_target import DEVICE, TOLERANCE, relative_error, requires_triton
from pdserve.engine.kernels import fused_moe as fused_moe_module
from pdserve.engine.kernels.fused_moe import fused_moe, fused_moe_reference, is_sparse
from pdserve.engine.kernels.moe_decode import PairConfig, moe_pairs_triton
from pdserve.engine.kernels.moe_routing import route, route_reference, route_triton
from test_fused_moe import make_inputs, per_token_loop

SMALL = PairConfig(8, 16, 8, 16, num_warps=2, num_stages=2)  # several tiles and K steps at test sizes


@requires_triton
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small-tiles"])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 1), (2, 6, 2), (1, 16, 8), (3, 24, 8), (4, 10, 3)])
def test_matches_reference_float32(num_tokens, num_experts, top_k, config):
    """k = 1 and k = 8, E not a power of two, partial tiles (hidden 40, intermediate 24)."""
    inputs = make_inputs(num_tokens, 40, 24, num_experts, top_k, torch.float32, seed=num_experts)
    out = moe_pairs_triton(*inputs, config=config)
    assert out.shape == (num_tokens, 40) and out.dtype == torch.float32
    assert relative_error(out, fused_moe_reference(*inputs)) < TOLERANCE[torch.float32]
    assert relative_error(out.cpu(), per_token_loop(*inputs)) < TOLERANCE[torch.float32]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    inputs = make_inputs(2, 48, 40, 8, 2, dtype)
    out = moe_pairs_triton(*inputs, config=SMALL)
    assert out.dtype == dtype
    assert relative_error(out, fused_moe_reference(*inputs)) < {**TOLERANCE, torch.float16: 1e-2}[dtype]


@requires_triton
def test_pairs_sharing_an_expert():
    """Every token on the same two experts: each pair still counts once, with its own weight."""
    inputs = make_inputs(3, 32, 16, 5, 2, torch.float32)
    inputs[4] = torch.tensor([[4, 1]] * 3, device=DEVICE)
    assert relative_error(moe_pairs_triton(*inputs, config=SMALL), fused_moe_reference(*inputs)) < 1e-5


@requires_triton
def test_out_of_range_id_contributes_nothing():
    inputs = make_inputs(2, 32, 16, 4, 2, torch.float32)
    inputs[4] = torch.tensor([[0, 7], [-1, 3]], device=DEVICE)
    x, w13, w2, weights, _ = [t.cpu() for t in inputs]
    expected = torch.stack([  # token 0: its slot on expert 0 alone; token 1: its slot on expert 3 alone
        fused_moe_reference(x[:1], w13, w2, weights[:1, :1], torch.tensor([[0]]))[0],
        fused_moe_reference(x[1:], w13, w2, weights[1:, 1:], torch.tensor([[3]]))[0],
    ])
    assert relative_error(moe_pairs_triton(*inputs, config=SMALL).cpu(), expected) < 1e-5


def test_sparse_switch_by_pairs_per_expert(monkeypatch):
    assert not is_sparse(1, 128)  # off by default (the module says why)
    monkeypatch.setattr(fused_moe_module, "SPARSE_PAIRS_PER_EXPERT", 0.5)
    assert is_sparse(8, 128) and is_sparse(64, 128) and not is_sparse(512, 128)  # Qwen3-30B-A3B: T = 1, 8, 64
    assert is_sparse(2, 8) and not is_sparse(8, 8)  # Mixtral: T = 1, 4


def test_dispatcher_uses_reference_on_cpu():
    inputs = [t.cpu() for t in make_inputs(1, 32, 16, 8, 2, torch.float32)]
    assert torch.equal(fused_moe(*inputs), fused_moe_reference(*inputs))


def router_logits(num_tokens, num_experts, dtype, seed=0):
    """Distinct values in every row, exact in bf16 (no ties: torch.topk orders ties as it likes)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)]
    return ((torch.stack(rows).float() - num_experts / 2) / 8).to(dtype).to(DEVICE)


@requires_triton
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 128, 8), (5, 8, 2), (3, 60, 1), (2, 6, 6), (4, 12, 3)])
def test_routing_matches_torch(num_tokens, num_experts, top_k, renormalize):
    """k = 1, k = E, E not a power of two; bf16 logits as the router GEMV writes them."""
    logits = router_logits(num_tokens, num_experts, torch.bfloat16, seed=num_experts)
    weights, ids = route_triton(logits, top_k, renormalize)
    expected_weights, expected_ids = route_reference(logits.cpu(), top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(weights.cpu(), expected_weights, rtol=1e-5, atol=1e-7)  # GPU exp: a few ulp
    if renormalize:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(num_tokens))


@requires_triton
def test_routing_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE)
    weights, ids = route_triton(logits, 2, renormalize=True)
    assert ids.tolist() == [[1, 2]] and weights.tolist()[0] == pytest.approx([0.5, 0.5])


def test_routing_dispatcher_on_cpu_is_torch():
    logits = router_logits(3, 16, torch.float32).cpu()
    weights, ids = route(logits, 4, renormalize=False)
    expected_weights, expected_ids = logits.softmax(-1).topk(4, dim=-1)
    assert torch.equal(ids, expected_ids.int()) and torch.equal(weights, expected_weights)
