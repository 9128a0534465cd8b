"""Penalties, logit_bias and min_tokens: the sampler's batched device rules equal the plain reference of
each rule, greedy takes the adjusted argmax, logprobs stay the model's, and token histories kept on the
device (filled once, then counted as tokens are sampled) equal histories built from the tokens."""
import pytest
import torch

from pdserve.engine.penalties import RowHistory, TokenCounts, TokenFill, penalties, penalties_from_tokens
from pdserve.engine.sampler import SamplingParams, sample, sample_async, sample_first
from penalty_reference import adjusted_logits

VOCAB = 40
PROMPTS = [[3, 5, 5, 7], [1, 2], [9, 9, 9, 30], [4], [11, 12, 13]]
OUTPUTS = [[5, 8, 8, 8], [2, 6], [], [4, 4, 39], [20]]
STOP_IDS = [frozenset({1, 8}), frozenset({6}), frozenset({2}), frozenset(), frozenset({20, 21})]

RULES = {
    "repetition above 1": SamplingParams(repetition_penalty=1.7),
    "repetition below 1": SamplingParams(repetition_penalty=0.6),
    "frequency": SamplingParams(frequency_penalty=1.5),
    "negative frequency": SamplingParams(frequency_penalty=-2.0),
    "presence": SamplingParams(presence_penalty=2.0),
    "min_tokens": SamplingParams(min_tokens=5),
    "logit_bias": SamplingParams(logit_bias=((8, 100.0), (0, -3.5), (39, 2.0))),
    "all at once": SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7,
                                  min_tokens=3, logit_bias=((5, 4.0), (8, -1.0))),
}


def _logits(rows: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, 0] = 0.0  # a logit of exactly 0 is neither divided nor multiplied into anything else
    return logits


def _reference(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    return torch.stack([adjusted_logits(logits[i], params[i], PROMPTS[i], OUTPUTS[i], STOP_IDS[i])
                        for i in range(len(params))])


def _from_tokens(params: list[SamplingParams]):
    return penalties_from_tokens(params, PROMPTS, OUTPUTS, STOP_IDS, VOCAB, torch.device("cpu"))


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_each_rule_equals_the_reference_and_leaves_other_rows_alone(rule):
    logits = _logits()
    params = [rule, SamplingParams(), rule, rule, SamplingParams(temperature=0.5)]
    adjusted = _from_tokens(params).apply(logits)
    assert torch.equal(adjusted[[1, 4]], logits[[1, 4]])
    torch.testing.assert_close(adjusted, _reference(logits, params), rtol=1e-6, atol=1e-6)
    assert not torch.equal(adjusted, logits)


def test_min_tokens_holds_the_stop_ids_back_only_below_it():
    logits = _logits()
    logits[:, 8] = 50.0  # the stop id 8 of row 0 is everyone's favourite
    params = [SamplingParams(min_tokens=5), SamplingParams(min_tokens=2), SamplingParams(min_tokens=1),
              SamplingParams(min_tokens=4), SamplingParams(min_tokens=1)]
    tokens = sample(logits, params, [len(p) + len(o) for p, o in zip(PROMPTS, OUTPUTS)], _from_tokens(params)).token_ids
    assert tokens[0] != 8  # 4 output tokens < 5: 8 cannot be sampled
    assert tokens[1:] == [8] * 4  # 8 is no stop id of theirs, or they have their min_tokens already


def test_greedy_and_random_rows_sample_the_adjusted_logits_and_logprobs_stay_the_models():
    logits = _logits()
    rule = RULES["all at once"]
    params = [SamplingParams(repetition_penalty=1.7, logprobs=True), rule,
              SamplingParams(temperature=0.8, seed=3, presence_penalty=2.0, logprobs=True), rule, SamplingParams()]
    positions = [len(p) + len(o) for p, o in zip(PROMPTS, OUTPUTS)]
    result = sample(logits, params, positions, _from_tokens(params))
    reference = _reference(logits, params)
    assert [result.token_ids[i] for i in (0, 1, 3, 4)] == [int(reference[i].argmax()) for i in (0, 1, 3, 4)]
    assert result.token_ids[2] == sample(reference[2:3], [params[2]], [positions[2]]).token_ids[0]
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs[0] == pytest.approx(float(raw[0, result.token_ids[0]]))
    assert result.logprobs[2] == pytest.approx(float(raw[2, result.token_ids[2]]))


def test_a_first_token_reads_the_prompt_as_its_history():
    logits = _logits()
    logits[:, 5] = 4.0  # in prompt 0: the repetition penalty must move the choice off it
    logits[:, 1] = 10.0  # prompt 1's stop id, held back by min_tokens
    params = [SamplingParams(repetition_penalty=100.0), SamplingParams(min_tokens=1), SamplingParams()]
    tokens = sample_first(logits[:3], params, PROMPTS[:3], STOP_IDS[:3]).token_ids
    assert tokens[0] != 5 and tokens[0] == int(adjusted_logits(logits[0], params[0], PROMPTS[0], []).argmax())
    assert tokens[1] != 1 and tokens[2] == 1


def test_histories_kept_on_the_device_equal_histories_from_the_tokens():
    """Slots filled once, then each sampled token counted: what a decode replica does step by step."""
    params = [SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5), SamplingParams(),
              SamplingParams(presence_penalty=1.0, min_tokens=6)]
    prompts, outputs = [list(PROMPTS[0]), [], list(PROMPTS[2])], [list(OUTPUTS[0]), [], []]
    counts = TokenCounts(VOCAB, torch.device("cpu"))
    slots = [5, None, 2]  # any slots, growing the table past its first size
    for step in range(6):
        logits = _logits(3, seed=step)
        histories = [RowHistory(len(outputs[i]), STOP_IDS[i], slots[i],
                                TokenFill(prompts[i], outputs[i]) if step == 0 else None) if slots[i] is not None
                     else None for i in range(3)]
        kept = penalties(params, histories, counts)
        rebuilt = penalties_from_tokens(params, prompts, outputs, [STOP_IDS[i] for i in range(3)], VOCAB,
                                        torch.device("cpu"))
        assert torch.equal(kept.apply(logits), rebuilt.apply(logits))
        pending = sample_async(logits, params, [0, 0, 0], kept)
        kept.count(pending.tokens)
        for i, token in enumerate(pending.result().token_ids):
            outputs[i].append(token)


def test_a_reused_slot_forgets_its_last_owner():
    counts = TokenCounts(VOCAB, torch.device("cpu"))
    params = [SamplingParams(frequency_penalty=1.0)]
    first = penalties(params, [RowHistory(3, slot=0, fill=TokenFill([1], [7, 7, 7]))], counts)
    first.count(torch.tensor([7]))
    logits = torch.zeros(1, VOCAB)
    second = penalties(params, [RowHistory(1, slot=0, fill=TokenFill([2], [9]))], counts)
    adjusted = second.apply(logits)
    assert adjusted[0, 7] == 0 and adjusted[0, 9] == -1


def test_no_rule_no_adjustments():
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3, logprobs=True)]
    assert _from_tokens(params) is None
    assert penalties(params, [None, None], TokenCounts(VOCAB, torch.device("cpu"))) is None


def test_ids_outside_the_logits_are_ignored():
    """A tokenizer may know more ids than the model's logits have: those can never be sampled anyway."""
    params = [SamplingParams(logit_bias=((VOCAB + 3, 50.0), (2, 1.0)), min_tokens=1)]
    logits = torch.zeros(1, VOCAB)
    adjusted = penalties_from_tokens(params, [[1]], [[]], [frozenset({VOCAB})], VOCAB, torch.device("cpu")).apply(logits)
    assert adjusted[0, 2] == 1 and adjusted.sum() == 1
