"""Prefill worker → gloo KV transfer → decode worker, in one process, no Ray: tokens equal the engine alone."""
import random
import time

from handoff_helpers import engine_outputs, run_all_at_once, run_request


def test_concurrent_handoffs_decode_to_the_engines_tokens(loaded, workers):
    prefill, decode = workers
    rng = random.Random(3)
    requests = [([rng.randrange(2, 128) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 20)) for _ in range(24)]
    assert run_all_at_once(prefill, decode, requests) == engine_outputs(loaded, requests)
    assert decode.pool.num_free == decode.pool.num_blocks
    load, batches = decode.load(), prefill.batch_times()  # the step clocks measured both loops
    assert load.gpu_step_time_s > 0 and load.step_time_s > 0 and 0 <= load.gpu_idle_share <= 1
    assert batches.step_busy_s > 0 and 0 <= batches.idle_share <= 1
    assert prefill.pool.num_free + prefill.prefix_cache.num_blocks == prefill.pool.num_blocks  # the rest: cached


def test_a_shared_prefix_is_computed_once_and_still_decodes_to_the_engines_tokens(loaded, workers):
    prefill, decode = workers
    rng = random.Random(5)
    system = [rng.randrange(2, 128) for _ in range(42)]  # 10 full blocks of 4, then 2 tokens
    prompts = [system + [1 + i] + [rng.randrange(2, 128) for _ in range(rng.randrange(0, 9))] for i in range(4)]
    prompts.append(list(prompts[0]))  # the same prompt again: all but its last block can come from the cache
    expected = engine_outputs(loaded, [(prompt, 6) for prompt in prompts])

    results = [run_request(prefill, decode, prompt, 6) for prompt in prompts]

    assert results == expected
    cached = 3 * 40 + 4 * ((len(prompts[0]) - 1) // 4)
    assert prefill.prefix_hit_rate() == cached / sum(len(p) for p in prompts)
    assert decode.pool.num_free == decode.pool.num_blocks


def test_stop_tokens_end_sequences_mid_batch_and_their_blocks_come_back(loaded, workers):
    """A sequence that stops on a stop token leaves the batch at once (with the loop one step
    ahead, its row in the step already queued is dropped); the others go on to their lengths."""
    prefill, decode = workers
    rng = random.Random(11)
    prompts = [[rng.randrange(2, 128) for _ in range(rng.randrange(3, 30))] for _ in range(8)]
    full = engine_outputs(loaded, [(prompt, 16) for prompt in prompts])
    # Each even request stops at its own 4th token (the first time that token appears).
    stops = [frozenset({out[3]}) if i % 2 == 0 else frozenset() for i, out in enumerate(full)]
    expected = [out[:out.index(min(stop)) + 1] if stop else out for out, stop in zip(full, stops)]
    assert run_all_at_once(prefill, decode, [(prompt, 16) for prompt in prompts], stops) == expected
    assert any(len(e) < 16 for e in expected)
    deadline = time.monotonic() + 5
    while decode.pool.num_free != decode.pool.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decode.pool.num_free == decode.pool.num_blocks


def test_after_a_remote_prefill_a_stream_interval_sends_the_decoded_tokens_that_many_at_a_time(loaded, workers):
    """The prefill's first token went to the client already: the decode replica's tokens leave N at a time."""
    prefill, decode = workers
    sizes = []
    tokens = run_request(prefill, decode, [5, 9, 13, 2], 9, stream_interval=4, sizes=sizes)
    assert tokens == engine_outputs(loaded, [([5, 9, 13, 2], 9)])[0]
    assert sizes == [4, 4]  # tokens 2-5 and 6-9; the last with the ending
