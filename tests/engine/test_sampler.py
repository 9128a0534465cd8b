"""Sampling: seeded reproducibility, and top-k / top-p never pick outside their set."""
import torch

from pdserve.engine.sampler import SamplingParams, gumbel_noise, sample


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    assert sample(logits, [SamplingParams()] * 4, [0] * 4).token_ids == logits.argmax(-1).tolist()


def test_same_seed_and_position_same_token_in_any_batch():
    logits = _logits(rows=1)
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(logits, [params], [7]).token_ids
    batched = sample(torch.cat([_logits(rows=3, seed=5), logits]),
                     [SamplingParams(temperature=0.7, seed=9)] * 3 + [params], [1, 2, 3, 7]).token_ids
    assert batched[-1] == alone[0]


def test_different_seeds_or_positions_differ():
    logits = torch.zeros(1, 1000)
    draws = {sample(logits, [SamplingParams(temperature=1.0, seed=s)], [p]).token_ids[0]
             for s in range(20) for p in range(5)}
    assert len(draws) > 80


def test_top_k_stays_in_the_k_most_likely():
    logits = _logits(rows=1, vocab=100)
    allowed = set(logits[0].topk(5).indices.tolist())
    for seed in range(200):
        token = sample(logits, [SamplingParams(temperature=2.0, top_k=5, seed=seed)], [0]).token_ids[0]
        assert token in allowed


def test_top_p_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    seen = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.75, seed=s)], [0]).token_ids[0] for s in range(300)}
    assert seen == {0, 1}


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().unsqueeze(0)
    counts = torch.zeros(3)
    for position in range(3000):
        counts[sample(logits, [SamplingParams(temperature=1.0, seed=42)], [position]).token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_gumbel_noise_is_a_pure_function():
    a = gumbel_noise([3, 4], [10, 11], 64, torch.device("cpu"))
    b = gumbel_noise([3, 4], [10, 11], 64, torch.device("cpu"))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_logprobs_are_the_models():
    logits = _logits(rows=2)
    result = sample(logits, [SamplingParams(logprobs=True), SamplingParams()], [0, 0])
    expected = torch.log_softmax(logits[0], -1)[result.token_ids[0]].item()
    assert abs(result.logprobs[0] - expected) < 1e-6 and result.logprobs[1] is None
