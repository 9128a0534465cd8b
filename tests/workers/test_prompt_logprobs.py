"""Prompt logprobs through the prefill worker: each prompt token's logprob, rank and top N equal
transformers' log_softmax at the position before it, across chunked prefill (prompts longer than the
pair's 32-token budget) and for a prompt whose prefix is cached (which it then does not reuse)."""
import time

import pytest
import torch

from pdserve.engine.loader import load_model_dir
from pdserve.engine.messages import PrefillRequest, SamplingParams
from tiny_models import save_tiny_model

LONG = [(7 * i + 3) % 120 + 1 for i in range(75)]  # three chunks of the 32-token budget


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prompt-logprobs")
    return save_tiny_model("llama", directory, max_position_embeddings=512), directory


@pytest.fixture(scope="module")
def loaded(model_and_dir):  # the `workers` pair of conftest serves this model
    return load_model_dir(model_and_dir[1])


def prefill_result(prefill, decode, prompt, params):
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(prompt), 1, deadline)
    result = prefill.submit(PrefillRequest("r", tuple(prompt), params, reservation.destination, deadline)).result(60)
    decode.abort(reservation.transfer_id)
    return result


def assert_equal_transformers(model, prompt, result, num_top):
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert [p.token_id for p in result.prompt_logprobs] == prompt[1:]
    for position, scored in enumerate(result.prompt_logprobs):
        row = reference[position]
        assert abs(scored.logprob - row[prompt[position + 1]].item()) < 1e-4
        assert scored.rank == int((row > row[prompt[position + 1]]).sum()) + 1
        top = row.topk(num_top)
        assert [t for t, _ in scored.top] == top.indices.tolist()
        assert all(abs(a - b) < 1e-4 for (_, a), b in zip(scored.top, top.values.tolist()))


def test_a_chunked_prompt_scores_every_token_after_its_first(workers, model_and_dir):
    prefill, decode = workers
    result = prefill_result(prefill, decode, LONG, SamplingParams(prompt_logprobs=5))
    assert len(result.prompt_logprobs) == len(LONG) - 1
    assert_equal_transformers(model_and_dir[0], LONG, result, 5)


def test_a_cached_prefix_is_computed_again_for_a_prompt_that_asks(workers, model_and_dir):
    prefill, decode = workers
    prefill_result(prefill, decode, LONG[:40], SamplingParams())  # fills the prefix cache
    result = prefill_result(prefill, decode, LONG[:40] + [9, 8, 7], SamplingParams(prompt_logprobs=0))
    assert prefill.prefix_hit_rate() == 0.0  # none of it came from the cache
    assert all(p.top == () for p in result.prompt_logprobs)
    assert_equal_transformers(model_and_dir[0], LONG[:40] + [9, 8, 7], result, 0)
    plain = prefill_result(prefill, decode, LONG[:40], SamplingParams())
    assert plain.prompt_logprobs == () and prefill.prefix_hit_rate() > 0  # a prompt that does not ask reuses it
