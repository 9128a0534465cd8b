"""Penalised decode steps through the runner, on the engine tests' device: steps queued one ahead (a row's
last token fed back on the device, and counted in its history there) give the tokens of steps read one
by one, and in float32 the greedy rows give the plain reference's over transformers' own forward."""
import pytest

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT, block_tables
from pdserve.engine.loader import load_model_dir
from pdserve.engine.penalties import RowHistory, TokenFill
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams, sample_first
from penalty_reference import greedy_generate
from tiny_models import save_tiny_model

PROMPTS = [[99, 115, 55, 7, 35, 125, 67, 64, 53], [5, 9, 13, 2], [7] * 6, [19, 38, 19, 98, 14, 81], [41, 14, 95]]
MAX_TOKENS = [16, 9, 12, 14, 10]  # sequences leave the batch at different steps
STOP_IDS = [frozenset(), frozenset({50}), frozenset({7}), frozenset(), frozenset({1})]
PARAMS = [
    SamplingParams(frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.1),
    SamplingParams(min_tokens=5, logit_bias=((50, 100.0),)),  # 50 from the 6th token on
    SamplingParams(repetition_penalty=2.0, min_tokens=3),
    SamplingParams(),
    SamplingParams(temperature=0.9, seed=5, presence_penalty=1.5, logit_bias=((3, 2.0),)),
]
GREEDY = [i for i, p in enumerate(PARAMS) if p.is_greedy]


def generate(runner: ModelRunner, lag: int) -> list[list[int]]:
    """Decode every prompt to its max_tokens (no stop), `lag` steps queued before one is read; each step
    rotates the batch, so a row's source is rarely its own row. Sequence i holds history slot 4 - i."""
    tables = block_tables(PROMPTS, MAX_TOKENS)
    logits = runner.prefill([PrefillChunk(tuple(p), 0, t) for p, t in zip(PROMPTS, tables)])
    outputs = [[t] for t in sample_first(logits, PARAMS, PROMPTS, STOP_IDS).token_ids]
    filled, in_flight = set(), []
    for step in range(100):
        previous_rows = {i: row for row, i in enumerate(in_flight[-1][0])} if in_flight else {}
        batch = [i for i in range(len(PROMPTS)) if len(outputs[i]) + (i in previous_rows) < MAX_TOKENS[i]]
        batch = batch[step % len(batch):] + batch[:step % len(batch)] if batch else []
        inputs, histories = [], []
        for i in batch:
            position = len(PROMPTS[i]) + len(outputs[i]) - 1
            fed_back = i in previous_rows
            inputs.append(DecodeInput(0, position + 1, tables[i], previous_rows[i]) if fed_back
                          else DecodeInput(outputs[i][-1], position, tables[i]))
            fill = None if i in filled or not PARAMS[i].needs_history else TokenFill(PROMPTS[i], list(outputs[i]))
            filled.add(i)
            histories.append(RowHistory(len(outputs[i]) + fed_back, STOP_IDS[i], 4 - i, fill)
                             if PARAMS[i].adjusts_logits else None)
        if batch:
            in_flight.append((batch, runner.decode_and_sample(inputs, [PARAMS[i] for i in batch], histories)))
        while len(in_flight) > (lag if batch else 0):
            rows, pending = in_flight.pop(0)
            for i, token in zip(rows, pending.result().token_ids):
                outputs[i].append(token)
        if not batch and not in_flight:
            return outputs
    raise AssertionError("did not finish")


@pytest.mark.parametrize("max_decode_batch", [4, 8])  # on CUDA, 4: the first steps run eagerly, later ones graphed
def test_penalised_steps_queued_one_ahead_equal_steps_read_one_by_one_and_the_reference(tmp_path, max_decode_batch):
    model = save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    read_each = generate(ModelRunner(loaded, 64, 4, max_decode_batch=max_decode_batch), lag=0)
    one_ahead = generate(ModelRunner(loaded, 64, 4, max_decode_batch=max_decode_batch), lag=1)
    assert [len(o) for o in one_ahead] == MAX_TOKENS
    assert one_ahead == read_each
    assert read_each[1][5:] == [50] * (MAX_TOKENS[1] - 5) and 50 not in read_each[1][:5]
    if IS_EXACT:
        for i in GREEDY:  # the reference ends at a stop id; this loop runs on to max_tokens
            reference = greedy_generate(model, PROMPTS[i], PARAMS[i], MAX_TOKENS[i], STOP_IDS[i])
            assert read_each[i][:len(reference)] == reference, i
