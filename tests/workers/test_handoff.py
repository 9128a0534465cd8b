"""Prefill worker → gloo KV transfer → decode worker, in one process, no Ray: tokens equal the engine alone."""
import random
import threading
import time

import pytest

from pdserve.decode_worker.outbox import Outbox, TokenBatch
from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings, prefill_settings
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.loader import load_model_dir
from pdserve.engine.messages import PrefillRequest, SamplingParams, StreamStart
from pdserve.engine.offline import OfflineEngine, OfflineSequence
from pdserve.engine.runner import ModelRunner
from pdserve.engine.transfer import make_receiver, make_sender
from pdserve.prefill_worker.worker import PrefillWorker
from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("handoff")
    save_tiny_model("llama", directory, max_position_embeddings=512)
    return load_model_dir(directory)


@pytest.fixture(params=[False, True], ids=["read-each-step", "one-step-ahead"])
def workers(loaded, request):
    """The decode loop both ways: reading each step's tokens before the next (the CPU's default)
    and queueing step N+1 before reading step N (the GPU's)."""
    decode_runner = ModelRunner(loaded, 256, 4)
    receiver = make_receiver("gloo", decode_runner.kv_cache, peer_id="decode-test")
    config = load_config({"decode": {"overlap_steps": request.param}, "transfer": {"timeout_s": 20},
                          "prefill": {"max_batch_tokens": 32}, "kv_cache": {"block_size": 4}})
    decode = DecodeWorker(decode_runner, receiver, decode_settings(config), "decode-test")
    prefill_runner = ModelRunner(loaded, 128, 4)
    sender = make_sender("gloo", prefill_runner.kv_cache, sender_id="prefill-test")
    prefill = PrefillWorker(prefill_runner, sender, prefill_settings(config), "prefill-test")
    yield prefill, decode
    prefill.close()
    decode.close()


def run_request(prefill, decode, prompt, max_tokens, params=SamplingParams(), stop_ids=frozenset()):
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(prompt), max_tokens, deadline)
    result = prefill.submit(PrefillRequest("r", tuple(prompt), params, reservation.destination, deadline)).result(timeout=60)
    batches: list[TokenBatch] = []
    done = threading.Event()

    def deliver(batch: TokenBatch):
        batches.append(batch)
        if batch.endings:
            done.set()

    start = StreamStart(reservation.transfer_id, "r", tuple(prompt), (result.first_token,), False, max_tokens,
                        params, stop_ids, deadline)
    decode.open(start, Outbox(deliver))
    assert done.wait(60)
    ending = batches[-1].endings[-1]
    assert ending.error is None and ending.transfer_id == reservation.transfer_id, ending.error
    assert {t for b in batches for t in b.transfer_ids} <= {reservation.transfer_id}
    return [result.first_token] + [t for b in batches for t in b.token_ids]


def engine_outputs(loaded, requests) -> list[list[int]]:
    """The engine's own greedy tokens for each (prompt, max_tokens), one request at a time."""
    engine = OfflineEngine(loaded, num_blocks=512, block_size=4)
    outputs = []
    for prompt, max_tokens in requests:
        seq = OfflineSequence(prompt, max_tokens)
        list(engine.generate([seq], ignore_eos=True))
        outputs.append(seq.output)
    return outputs


def run_all_at_once(prefill, decode, requests, stop_ids=None) -> list[list[int]]:
    """`run_request` for every (prompt, max_tokens) at the same time, each on its own thread."""
    results = [None] * len(requests)

    def one(i):
        prompt, max_tokens = requests[i]
        results[i] = run_request(prefill, decode, prompt, max_tokens, stop_ids=stop_ids[i] if stop_ids else frozenset())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


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
