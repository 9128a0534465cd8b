"""Top-N logprobs and min_p: the sampler's batched device work against plain torch, and the runner's
first and decode tokens against transformers' own forward on the same weights."""
import pytest
import torch

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT
from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams, sample, sample_first
from tiny_models import save_tiny_model


def _logits(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _reference(logits: torch.Tensor, k: int) -> list[tuple[int, float]]:
    top = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return list(zip(top.indices.tolist(), top.values.tolist()))


def _assert_close(got: tuple, expected: list, tol: float = 1e-5) -> None:
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert all(abs(a - b) < tol for (_, a), (_, b) in zip(got, expected))


def test_each_row_gets_its_own_number_of_the_most_likely():
    logits = _logits(4)
    params = [SamplingParams(logprobs=True, top_logprobs=5), SamplingParams(),
              SamplingParams(logprobs=True), SamplingParams(logprobs=True, top_logprobs=2, temperature=1.0, seed=3)]
    result = sample(logits, params, [0] * 4)
    _assert_close(result.top_logprobs[0], _reference(logits[0], 5))
    assert result.top_logprobs[1] == () and result.top_logprobs[2] == ()
    _assert_close(result.top_logprobs[3], _reference(logits[3], 2))
    # the top logprobs are the model's raw ones: temperature (row 3) changes neither them nor the chosen one's
    chosen = torch.log_softmax(logits[3], -1)[result.token_ids[3]].item()
    assert abs(result.logprobs[3] - chosen) < 1e-6


def test_a_batch_that_asks_for_none_runs_no_softmax_or_topk(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: calls.append("log_softmax"))
    monkeypatch.setattr(torch.Tensor, "topk", lambda *a, **k: calls.append("topk"))
    result = sample(_logits(3), [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams()], [0] * 3)
    assert calls == [] and result.top_logprobs == [(), (), ()] and result.logprobs == [None] * 3


def test_min_p_keeps_only_tokens_near_the_most_likely():
    logits = torch.tensor([[4.0, 3.5, 0.0, -1.0] + [-9.0] * 12])
    probs = logits.softmax(-1)[0]
    kept = {i for i in range(16) if probs[i] >= 0.3 * probs.max()}
    assert kept == {0, 1}
    draws = {sample(logits, [SamplingParams(temperature=1.0, seed=s, min_p=0.3)], [p]).token_ids[0]
             for s in range(40) for p in range(3)}
    assert draws == kept
    plain = {sample(logits, [SamplingParams(temperature=1.0, seed=s)], [p]).token_ids[0]
             for s in range(40) for p in range(3)}
    assert plain - kept  # without min_p the tail is drawn too
    assert sample(logits, [SamplingParams(min_p=0.99)], [0]).token_ids == [0]  # greedy: unaffected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    model = save_tiny_model("llama", directory)
    return model, load_model_dir(directory, DEVICE, DTYPE_NAME)


PROMPT = [99, 115, 55, 7, 35, 125, 67, 64, 53]


def test_first_and_decode_tokens_top_logprobs_equal_transformers(llama):
    model, loaded = llama
    runner = ModelRunner(loaded, 32, 4)
    tol = 1e-4 if IS_EXACT else 5e-2
    params = [SamplingParams(logprobs=True, top_logprobs=20), SamplingParams(logprobs=True, top_logprobs=3)]
    prompts = [PROMPT, PROMPT[:5]]
    tables = [tuple(range(0, 4)), tuple(range(4, 8))]
    logits = runner.prefill([PrefillChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)])
    first = sample_first(logits, params, prompts, [frozenset()] * 2)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            reference = model(torch.tensor([prompt])).logits[0, -1]
            _assert_close(first.top_logprobs[i], _reference(reference, params[i].top_logprobs), tol)
    inputs = [DecodeInput(first.token_ids[i], len(p), tables[i]) for i, p in enumerate(prompts)]
    step = runner.decode_and_sample(inputs, params).result()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            reference = model(torch.tensor([prompt + [first.token_ids[i]]])).logits[0, -1]
            _assert_close(step.top_logprobs[i], _reference(reference, params[i].top_logprobs), tol)
            assert step.token_ids[i] == step.top_logprobs[i][0][0]  # greedy: the most likely
