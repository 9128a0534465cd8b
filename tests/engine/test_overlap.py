"""Steps queued before the previous step's tokens reach the host give the tokens of steps read one by one."""
import pytest

from engine_target import DEVICE, DTYPE_NAME, block_tables
from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams, sample
from tiny_models import save_tiny_model

PROMPTS = [[(5 * i + 3 * j) % 100 + 2 for j in range(4 + 3 * i)] for i in range(6)]
MAX_TOKENS = [9, 3, 12, 6, 1, 10]  # sequences leave the batch at different steps
PARAMS = [SamplingParams(), SamplingParams(temperature=0.8, seed=11), SamplingParams(logprobs=True),
          SamplingParams(temperature=1.3, top_k=7, seed=3), SamplingParams(), SamplingParams(top_p=0.9, temperature=1.0)]


def generate(runner: ModelRunner, lag: int) -> tuple[list[list[int]], list[list[float | None]]]:
    """Decode every prompt to its max_tokens; with lag 1 each step is queued before the last is read.

    Each step rotates the batch's row order, so a row's source is rarely its own row."""
    tables = block_tables(PROMPTS, MAX_TOKENS)
    logits = runner.prefill([PrefillChunk(tuple(p), 0, t) for p, t in zip(PROMPTS, tables)])
    first = sample(logits, PARAMS, [len(p) for p in PROMPTS])
    outputs, logprobs = [[t] for t in first.token_ids], [[lp] for lp in first.logprobs]
    in_flight: list[tuple[list[int], object]] = []  # (sequence of each row, pending tokens)
    for step in range(100):
        previous_rows = {i: row for row, i in enumerate(in_flight[-1][0])} if in_flight else {}
        batch = [i for i in range(len(PROMPTS)) if len(outputs[i]) + (i in previous_rows) < MAX_TOKENS[i]]
        batch = batch[step % len(batch):] + batch[:step % len(batch)] if batch else []
        inputs = []
        for i in batch:
            position = len(PROMPTS[i]) + len(outputs[i]) - 1
            if i in previous_rows:
                inputs.append(DecodeInput(0, position + 1, tables[i], previous_rows[i]))
            else:
                inputs.append(DecodeInput(outputs[i][-1], position, tables[i]))
        if batch:
            in_flight.append((batch, runner.decode_and_sample(inputs, [PARAMS[i] for i in batch])))
        while len(in_flight) > (lag if batch else 0):
            rows, pending = in_flight.pop(0)
            result = pending.result()
            for i, token, logprob in zip(rows, result.token_ids, result.logprobs):
                outputs[i].append(token)
                logprobs[i].append(logprob)
        if not batch and not in_flight:
            return outputs, logprobs
    raise AssertionError("did not finish")


@pytest.mark.parametrize("max_decode_batch", [4, 8])  # on CUDA, 4: the first steps run eagerly, later ones graphed
def test_steps_queued_one_ahead_give_the_same_tokens_as_steps_read_one_by_one(tmp_path, max_decode_batch):
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    read_each, read_each_logprobs = generate(ModelRunner(loaded, 64, 4, max_decode_batch=max_decode_batch), lag=0)
    one_ahead, one_ahead_logprobs = generate(ModelRunner(loaded, 64, 4, max_decode_batch=max_decode_batch), lag=1)
    assert [len(o) for o in one_ahead] == MAX_TOKENS
    assert one_ahead == read_each
    assert one_ahead_logprobs == read_each_logprobs
    assert all(lp is not None for lp in one_ahead_logprobs[2]) and one_ahead_logprobs[0][0] is None


def test_a_source_row_must_be_a_row_of_the_previous_step(tmp_path):
    save_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model_dir(tmp_path, DEVICE, DTYPE_NAME), 8, 4)
    with pytest.raises(ValueError, match="source row 0"):
        runner.decode_and_sample([DecodeInput(0, 0, (0,), 0)], [SamplingParams()])
    runner.decode_and_sample([DecodeInput(5, 0, (0,)), DecodeInput(6, 0, (1,))], [SamplingParams()] * 2)
    runner.decode_and_sample([DecodeInput(0, 1, (1,), 1)], [SamplingParams()])
    with pytest.raises(ValueError, match="source row 1"):
        runner.decode_and_sample([DecodeInput(0, 2, (1,), 1)], [SamplingParams()])
