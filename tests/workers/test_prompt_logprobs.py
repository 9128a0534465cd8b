"""Prompt logprobs through the prefill worker: each prompt token's logprob, rank and top N equal
transformers' log_softmax at the position before it, across chunked prefill (prompts longer than the
pair's 32-token budget) and for a prompt whose prefix is cached (which it then does not reuse); a decode
replica's own (colocated) prefill sends them in its first token's message, through the stream's proto."""
import threading
import time

import torch

from pdserve.decode_worker.outbox import Outbox
from pdserve.decode_worker.stream_server import batch_message
from pdserve.engine.messages import PrefillRequest, SamplingParams, StreamStart
from pdserve.router.decode_streams import _prompt_logprobs

LONG = [(7 * i + 3) % 120 + 1 for i in range(75)]  # three chunks of the 32-token budget


def prefill_result(prefill, decode, prompt, params):
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(prompt), 1, deadline)
    result = prefill.submit(PrefillRequest("r", tuple(prompt), params, reservation.destination, deadline)).result(60)
    decode.abort(reservation.transfer_id)
    return result


def assert_equal_transformers(model, prompt, prompt_logprobs, num_top, tol=1e-4):
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert [p.token_id for p in prompt_logprobs] == prompt[1:]
    for position, scored in enumerate(prompt_logprobs):
        row = reference[position]
        assert abs(scored.logprob - row[prompt[position + 1]].item()) < tol
        assert scored.rank == int((row > row[prompt[position + 1]]).sum()) + 1
        top = row.topk(num_top)
        assert [t for t, _ in scored.top] == top.indices.tolist()
        assert all(abs(a - b) < tol for (_, a), b in zip(scored.top, top.values.tolist()))


def test_a_chunked_prompt_scores_every_token_after_its_first(workers, model_and_dir):
    prefill, decode = workers
    result = prefill_result(prefill, decode, LONG, SamplingParams(prompt_logprobs=5))
    assert len(result.prompt_logprobs) == len(LONG) - 1
    assert_equal_transformers(model_and_dir[0], LONG, result.prompt_logprobs, 5)


def test_a_cached_prefix_is_computed_again_for_a_prompt_that_asks(workers, model_and_dir):
    prefill, decode = workers
    prefill_result(prefill, decode, LONG[:40], SamplingParams())  # fills the prefix cache
    result = prefill_result(prefill, decode, LONG[:40] + [9, 8, 7], SamplingParams(prompt_logprobs=0))
    assert prefill.prefix_hit_rate() == 0.0  # none of it came from the cache
    assert all(p.top == () for p in result.prompt_logprobs)
    assert_equal_transformers(model_and_dir[0], LONG[:40] + [9, 8, 7], result.prompt_logprobs, 0)
    plain = prefill_result(prefill, decode, LONG[:40], SamplingParams())
    assert plain.prompt_logprobs == () and prefill.prefix_hit_rate() > 0  # a prompt that does not ask reuses it


def test_a_local_prefill_sends_them_before_its_first_token(workers, model_and_dir):
    decode = workers[1]
    deadline = time.time() + 60
    reservation = decode.reserve("local", len(LONG), 2, deadline)
    batches, done = [], threading.Event()

    def deliver(batch):
        batches.append(batch)
        if batch.endings:
            done.set()

    decode.open(StreamStart(reservation.transfer_id, "local", tuple(LONG), (), True, 2, SamplingParams(prompt_logprobs=3),
                            frozenset(), deadline), Outbox(deliver))
    assert done.wait(60) and batches[-1].endings[-1].error is None
    scored = [b for b in batches if b.prompt_logprobs]
    assert len(scored) == 1 and scored[0].token_ids and batches.index(scored[0]) == 0  # with the first token
    message = batch_message(scored[0])
    assert [m.transfer_id for m in message.prompt_logprobs] == [reservation.transfer_id]
    received = _prompt_logprobs(message.prompt_logprobs[0])  # as the router reads it
    assert_equal_transformers(model_and_dir[0], LONG, received, 3, tol=1e-3)  # float32 on the wire
