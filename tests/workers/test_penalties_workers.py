"""Penalties, logit_bias and min_tokens through the workers, the decode loop both ways (reading each
step, and one step ahead): a remote prefill's first token, a local prefill's, and a failover's re-prefill
of the tokens already sent all give the tokens of the plain reference over transformers' own forward."""
import threading
import time

import pytest

from pdserve.decode_worker.outbox import Outbox
from pdserve.engine.messages import SamplingParams, StreamStart
from handoff_helpers import run_all_at_once, run_request
from penalty_reference import greedy_generate

MAX_TOKENS = 16
FORCED = 50  # a stop id a bias of 100 makes the only choice once min_tokens lets it be sampled
# name -> (prompt, params, stop ids; None: the token plain greedy takes first, which min_tokens then
# holds back from the prefill's first token)
CASES = {
    "every rule": ([5, 9, 13, 2, 9, 9, 40, 77, 13], SamplingParams(
        repetition_penalty=1.5, frequency_penalty=0.6, presence_penalty=0.4, min_tokens=6,
        logit_bias=((3, 1.5), (100, -2.0))), None),
    # the history read at the 6th token must hold the tokens sampled on the device since the slot's fill
    "penalties over the tokens sampled": ([99, 115, 55, 7, 35, 125, 67, 64, 53], SamplingParams(
        frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.1), frozenset()),
    # exactly min_tokens tokens, then the stop: min_tokens counts the token in flight too
    "min_tokens then a forced stop": ([5, 9, 13, 2], SamplingParams(min_tokens=5, logit_bias=((FORCED, 100.0),)),
                                      frozenset({FORCED})),
}


@pytest.fixture(scope="module", params=CASES, ids=CASES.keys())
def case(request, model_and_dir):
    """(prompt, params, stop ids, the reference's tokens); the rules change the plain greedy tokens."""
    prompt, params, stop_ids = CASES[request.param]
    model = model_and_dir[0]
    plain = greedy_generate(model, prompt, SamplingParams(), MAX_TOKENS)
    stop_ids = frozenset({plain[0]}) if stop_ids is None else stop_ids
    tokens = greedy_generate(model, prompt, params, MAX_TOKENS, stop_ids)
    assert tokens != plain[:len(tokens)] and len(tokens) > params.min_tokens
    if FORCED in stop_ids:
        assert tokens[params.min_tokens:] == [FORCED]
    return prompt, params, stop_ids, tokens


def decode_locally(decode, prompt, generated, params, stop_ids) -> list[int]:
    """The tokens a decode worker produces after prefilling prompt + generated itself (colocated, failover)."""
    deadline = time.time() + 60
    reservation = decode.reserve("local", len(prompt), MAX_TOKENS, deadline)
    tokens, done = [], threading.Event()

    def deliver(batch):
        tokens.extend(batch.token_ids)
        if batch.endings:
            assert batch.endings[-1].error is None, batch.endings[-1].error
            done.set()

    decode.open(StreamStart(reservation.transfer_id, "local", tuple(prompt), tuple(generated), True, MAX_TOKENS,
                            params, stop_ids, deadline), Outbox(deliver))
    assert done.wait(60)
    return tokens


def test_a_remote_prefill_then_decode_follow_the_rules(workers, case):
    prompt, params, stop_ids, tokens = case
    assert run_request(*workers, prompt, MAX_TOKENS, params, stop_ids) == tokens


def test_a_local_prefill_follows_the_rules(workers, case):
    prompt, params, stop_ids, tokens = case
    assert decode_locally(workers[1], prompt, (), params, stop_ids) == tokens


@pytest.mark.parametrize("num_sent", [1, 4])
def test_a_failover_re_prefill_counts_the_tokens_already_sent(workers, case, num_sent):
    """The new replica's history holds the prompt and the tokens sent: its next tokens are the ones the
    first replica would have produced (and min_tokens counts the sent tokens)."""
    prompt, params, stop_ids, tokens = case
    assert decode_locally(workers[1], prompt, tokens[:num_sent], params, stop_ids) == tokens[num_sent:]


def test_penalised_and_plain_requests_share_batches(workers, case):
    """Rows with and without rules in one batch; slots are reused as requests end."""
    prompt, params, stop_ids, tokens = case
    prefill, decode = workers
    plain = [([7, 8, 9], 10), ([11] * 5, 6)]
    expected_plain = run_all_at_once(prefill, decode, plain)
    results = [None] * 6

    def one(i):
        if i % 2:
            results[i] = run_request(prefill, decode, prompt, MAX_TOKENS, params, stop_ids)
        else:
            results[i] = run_request(prefill, decode, *plain[i // 2 % 2])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[1::2] == [tokens] * 3
    assert results[0::2] == [expected_plain[0], expected_plain[1], expected_plain[0]]
    assert decode.pool.num_free == decode.pool.num_blocks
