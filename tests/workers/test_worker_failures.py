"""How requests fail on the workers, driven through the fake transfer backend's fault injection:
a failed transfer, a passed deadline, an abort, a full queue, a full KV pool, a drain. Real
workers on a real tiny model; every case ends with every KV block back in its pool."""
import threading
import time

import pytest

from pdserve.decode_worker.errors import KvPoolFull, QueueFull, ReplicaDraining
from pdserve.decode_worker.outbox import Ending, Outbox, TokenBatch
from dataclasses import replace

from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings, prefill_settings
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.failures import FailureCode
from pdserve.engine.messages import PrefillRequest, SamplingParams, StreamStart
from pdserve.engine.runner import ModelRunner
from pdserve.engine.transfer import FaultInjection, make_receiver, make_sender
from pdserve.prefill_worker.worker import PrefillFailed, PrefillOverloaded, PrefillWorker
from handoff_helpers import engine_outputs

BLOCK = 4
PROMPT = list(range(2, 22))  # 20 tokens: 5 blocks


class Stream:
    """One subscriber's outbox: the tokens and endings it was handed."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.endings: dict[int, Ending] = {}
        self.changed = threading.Condition()
        self.outbox = Outbox(self._deliver)

    def _deliver(self, batch: TokenBatch) -> None:
        with self.changed:
            for tid, token in zip(batch.transfer_ids, batch.token_ids):
                self.tokens.setdefault(tid, []).append(token)
            self.endings.update({e.transfer_id: e for e in batch.endings})
            self.changed.notify_all()

    def ending(self, transfer_id: int, timeout_s: float = 30) -> Ending:
        with self.changed:
            assert self.changed.wait_for(lambda: transfer_id in self.endings, timeout_s), "no ending"
            return self.endings[transfer_id]

    def wait_tokens(self, transfer_id: int, n: int, timeout_s: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.tokens.get(transfer_id, [])) >= n, timeout_s)


SERVED = load_config({})  # the workers' settings as `pdserve serve` serves them, overridden per test


def start(reservation, prompt, max_tokens, generated=(), local=False, deadline=None) -> StreamStart:
    return StreamStart(reservation.transfer_id, f"r{reservation.transfer_id}", tuple(prompt), tuple(generated), local,
                       max_tokens, SamplingParams(), frozenset(), deadline or time.time() + 60)


def make_decode(loaded, num_blocks=64, receiver=True, **settings) -> DecodeWorker:
    runner = ModelRunner(loaded, num_blocks, BLOCK)
    peer = f"decode-{time.monotonic_ns()}"
    rx = make_receiver("fake", runner.kv_cache, peer_id=peer) if receiver else None
    return DecodeWorker(runner, rx, replace(decode_settings(SERVED), transfer_timeout_s=5, **settings), peer)


def make_prefill(loaded, num_blocks=64, faults=FaultInjection(), **settings) -> PrefillWorker:
    runner = ModelRunner(loaded, num_blocks, BLOCK)
    sender = make_sender("fake", runner.kv_cache, faults=faults)
    return PrefillWorker(runner, sender, replace(prefill_settings(SERVED), **{"max_batch_tokens": 32, **settings}),
                         "prefill-failures")


def assert_all_blocks_back(*workers, timeout_s: float = 5) -> None:
    """Every block free again; a prefill worker's cached prefixes are evicted first (they are its to keep)."""
    for worker in workers:
        if isinstance(worker, PrefillWorker):
            with worker._lock:  # the engine thread may be between batches
                worker.prefix_cache.evict(worker.prefix_cache.num_blocks)
        end = time.monotonic() + timeout_s  # blocks a queued step may write come back when it ends
        while worker.pool.num_free != worker.pool.num_blocks and time.monotonic() < end:
            time.sleep(0.01)
        assert worker.pool.num_free == worker.pool.num_blocks, type(worker).__name__


@pytest.fixture
def closing():
    workers = []
    yield workers.append
    for worker in workers:
        worker.close()


def test_a_failed_transfer_fails_both_ends_and_the_next_request_goes_through(loaded, closing):
    decode, prefill = make_decode(loaded), make_prefill(loaded, faults=FaultInjection(fail_nth=frozenset({1})))
    closing(decode), closing(prefill)
    stream = Stream()
    first = decode.reserve("r1", len(PROMPT), 8, time.time() + 60)
    decode.open(start(first, PROMPT, 8), stream.outbox)  # landing before prefill: the decode side sees it fail
    with pytest.raises(PrefillFailed) as failed:
        prefill.submit(PrefillRequest("r1", tuple(PROMPT), SamplingParams(), first.destination, time.time() + 60)).result(30)
    assert failed.value.code is FailureCode.TRANSFER_FAILED
    assert stream.ending(first.transfer_id).error_code is FailureCode.TRANSFER_FAILED

    second = decode.reserve("r2", len(PROMPT), 8, time.time() + 60)
    result = prefill.submit(PrefillRequest("r2", tuple(PROMPT), SamplingParams(), second.destination,
                                           time.time() + 60)).result(30)
    decode.open(start(second, PROMPT, 8, generated=[result.first_token]), stream.outbox)
    assert stream.ending(second.transfer_id).finish_reason == "length"
    assert [result.first_token] + stream.tokens[second.transfer_id] == engine_outputs(loaded, [(PROMPT, 8)])[0]
    assert_all_blocks_back(decode, prefill)


def test_a_deadline_passing_while_the_kv_is_awaited_or_queued_for_prefill_ends_the_request(loaded, closing):
    decode, prefill = make_decode(loaded), make_prefill(loaded, num_blocks=4)  # the prompt needs 5 blocks
    closing(decode), closing(prefill)
    stream = Stream()
    reservation = decode.reserve("r1", len(PROMPT), 8, time.time() + 0.5)
    decode.open(start(reservation, PROMPT, 8), stream.outbox)  # no prefill comes
    assert stream.ending(reservation.transfer_id).error_code is FailureCode.DEADLINE
    future = prefill.submit(PrefillRequest("r1", tuple(PROMPT), SamplingParams(), make_decode_destination(decode),
                                           time.time() + 0.5))
    with pytest.raises(PrefillFailed) as failed:
        future.result(10)
    assert failed.value.code is FailureCode.DEADLINE
    assert_all_blocks_back(decode, prefill)


def make_decode_destination(decode: DecodeWorker):
    """A destination on `decode` for a prompt of PROMPT's length, reserved for it."""
    return decode.reserve("dest", len(PROMPT), 1, time.time() + 0.5).destination


def test_an_abort_mid_decode_ends_the_request_silently_and_frees_its_blocks(loaded, closing):
    decode = make_decode(loaded, receiver=False)
    closing(decode)
    stream = Stream()
    running = decode.reserve("r1", len(PROMPT), 200, time.time() + 60)
    held = decode.reserve("r2", len(PROMPT), 8, time.time() + 60)  # reserved, never opened
    decode.open(start(running, PROMPT, 200, local=True), stream.outbox)
    stream.wait_tokens(running.transfer_id, 3)
    decode.abort(running.transfer_id, "client gone")
    decode.abort(held.transfer_id, "router gave up")
    assert_all_blocks_back(decode)
    assert running.transfer_id not in stream.endings  # the router asked: nobody is told
    assert len(stream.tokens[running.transfer_id]) < 200


def test_a_full_queue_refuses_at_once(loaded, closing):
    decode = make_decode(loaded, receiver=False, max_waiting=2)
    prefill = make_prefill(loaded, num_blocks=4, max_queued_requests=1)
    closing(decode), closing(prefill)
    held = [decode.reserve(f"r{i}", 4, 4, time.time() + 60) for i in range(2)]
    with pytest.raises(QueueFull):
        decode.reserve("r3", 4, 4, time.time() + 60)
    # The prompt needs more blocks than the prefill pool has: it stays queued until its deadline.
    destination = make_decode_destination(make_decode_for(loaded, closing))
    stuck = prefill.submit(PrefillRequest("p1", tuple(PROMPT), SamplingParams(), destination, time.time() + 1))
    with pytest.raises(PrefillOverloaded):
        prefill.submit(PrefillRequest("p2", tuple(PROMPT), SamplingParams(), destination, time.time() + 1))
    with pytest.raises(PrefillFailed):
        stuck.result(10)
    for reservation in held:
        decode.abort(reservation.transfer_id)
    assert_all_blocks_back(decode, prefill)


def make_decode_for(loaded, closing) -> DecodeWorker:
    decode = make_decode(loaded)
    closing(decode)
    return decode


def test_a_full_kv_pool_refuses_a_reservation_until_blocks_come_back(loaded, closing):
    decode = make_decode(loaded, num_blocks=16, receiver=False)  # 64 tokens
    closing(decode)
    stream = Stream()
    big = decode.reserve("r1", len(PROMPT), 36, time.time() + 60)  # 56 tokens: 14 blocks
    with pytest.raises(KvPoolFull):
        decode.reserve("r2", len(PROMPT), 8, time.time() + 60)
    decode.open(start(big, PROMPT, 36, local=True), stream.outbox)
    assert stream.ending(big.transfer_id).finish_reason == "length"
    after = decode.reserve("r2", len(PROMPT), 8, time.time() + 60)
    decode.open(start(after, PROMPT, 8, local=True), stream.outbox)
    assert stream.ending(after.transfer_id).finish_reason == "length"
    assert stream.tokens[after.transfer_id] == stream.tokens[big.transfer_id][:8]  # greedy: the same prompt
    assert_all_blocks_back(decode)


def test_prefill_waits_for_blocks_to_come_back_when_its_pool_runs_short(loaded, closing):
    """Two prompts that do not fit the prefill pool together: the second waits, queued, until the
    first's transfer finished and its blocks came back, then computes the engine's first token."""
    decode, prefill = make_decode(loaded), make_prefill(loaded, num_blocks=7, max_batch_tokens=64)
    closing(decode), closing(prefill)
    prompts = [PROMPT, [p + 30 for p in PROMPT]]
    reservations = [decode.reserve(f"r{i}", len(p), 1, time.time() + 60) for i, p in enumerate(prompts)]
    futures = [prefill.submit(PrefillRequest(f"r{i}", tuple(p), SamplingParams(), r.destination, time.time() + 60))
               for i, (p, r) in enumerate(zip(prompts, reservations))]
    firsts = [f.result(30).first_token for f in futures]
    assert firsts == [out[0] for out in engine_outputs(loaded, [(p, 1) for p in prompts])]
    for reservation in reservations:
        decode.abort(reservation.transfer_id)
    assert_all_blocks_back(decode, prefill)


def test_a_drain_finishes_what_the_replica_holds_and_takes_nothing_new(loaded, closing):
    decode, prefill = make_decode(loaded, receiver=False), make_prefill(loaded)
    closing(decode), closing(prefill)
    stream = Stream()
    running = decode.reserve("r1", len(PROMPT), 12, time.time() + 60)
    decode.open(start(running, PROMPT, 12, local=True), stream.outbox)
    assert decode.drain(30)
    assert stream.ending(running.transfer_id).finish_reason == "length"
    with pytest.raises(ReplicaDraining):
        decode.reserve("r2", 4, 4, time.time() + 60)
    target = make_decode_for(loaded, closing)
    destinations = [target.reserve(f"p{i}", len(PROMPT), 1, time.time() + 60).destination for i in range(2)]
    queued = prefill.submit(PrefillRequest("p0", tuple(PROMPT), SamplingParams(), destinations[0], time.time() + 60))
    assert prefill.drain(30)
    assert queued.result(30).first_token == engine_outputs(loaded, [(PROMPT, 1)])[0][0]
    with pytest.raises(PrefillOverloaded):
        prefill.submit(PrefillRequest("p1", tuple(PROMPT), SamplingParams(), destinations[1], time.time() + 60))
    assert_all_blocks_back(decode, prefill)


def test_a_drain_that_times_out_leaves_the_rest_to_close_which_frees_every_block(loaded):
    decode = make_decode(loaded)
    stream = Stream()
    landing = decode.reserve("r1", len(PROMPT), 8, time.time() + 60)
    decode.open(start(landing, PROMPT, 8), stream.outbox)  # its KV never comes
    held = decode.reserve("r2", len(PROMPT), 8, time.time() + 60)
    assert not decode.drain(0.2)
    decode.close()
    assert stream.ending(landing.transfer_id).error_code is FailureCode.UNAVAILABLE
    assert held.transfer_id not in stream.endings  # never opened: no stream to tell
    assert_all_blocks_back(decode)
