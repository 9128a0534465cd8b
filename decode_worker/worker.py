"""The decode worker: KV reservations, admission, and continuous batching.

One engine thread owns the model and loops: admit sequences whose KV landed,
advance local prefills by one chunk under the token budget, then one decode
step over every running sequence. Other threads (Ray calls, the gRPC stream
server) talk to it through `reserve`, `open` and `abort`, all under one lock;
none of them waits for the engine, and no thread waits for a request's KV: the
loop polls the receiver's ledger for every landing at once. A sequence's state
lives in one place, decode_worker/lifecycle.py (its diagram: sequence.py). Tokens leave through each sequence's subscriber
`Outbox`, flushed once per step: one message per router per step.

On the GPU the loop runs one step ahead (`DecodeSettings.overlap_steps`): it
queues step N+1, whose rows take step N's sampled tokens on the device, before
it reads step N's tokens; the host's work for a step then hides under the GPU's
work for the one before. What that costs: a sequence that stops on a stop token
at step N was also in step N+1 (its row there is dropped), and blocks freed
while a step that may write them is in flight go back to the pool when it ends.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from pdserve.engine.block_pool import BlockPool, BlockTable, NoFreeBlocks
from pdserve.engine.failures import FailureCode
from pdserve.engine.messages import DecodeLoad, Reservation, StreamStart, TopLogprobs
from pdserve.engine.prompt_logprobs import score_chunk
from pdserve.engine.runner import ModelRunner, PrefillChunk, logit_rows
from pdserve.engine.sampler import SampleResult, sample_first
from pdserve.engine.step_timing import StepClock, batch_rate
from pdserve.engine.transfer.base import KvReceiver

from .errors import KvPoolFull, QueueFull, ReplicaDraining
from .history_slots import HistorySlots
from .lifecycle import Lifecycle
from .outbox import Emission, Outbox
from .rates import HostTimePerSeq, RateMeter, TokenRate
from .sequence import DecodeSequence, SequenceState
from .steps import InFlight, Step, decode_input, prefill_chunks

log = logging.getLogger(__name__)


_RUNNING, _PREFILLING, _WAITING, _LANDING = (SequenceState.RUNNING, SequenceState.PREFILLING,
                                             SequenceState.WAITING, SequenceState.LANDING)


@dataclass(frozen=True)
class DecodeSettings:
    """No defaults: cluster/settings.py builds it from the config, which holds them."""

    max_running: int
    max_waiting: int
    prefill_chunk_tokens: int  # local prefill budget per step (colocated, short prompts, failover)
    transfer_timeout_s: float
    overlap_steps: bool | None  # queue step N+1 before reading step N's tokens; None: on CUDA
    arrival_window_s: float  # the window of the arrival rate it reports


class DecodeWorker:
    def __init__(self, runner: ModelRunner, receiver: KvReceiver | None, settings: DecodeSettings,
                 replica_id: str, stream_address: str = ""):
        self.runner = runner
        self.receiver = receiver
        self.settings = settings
        self.replica_id = replica_id
        self.stream_address = stream_address
        spec = runner.kv_cache.spec
        self.pool = BlockPool(spec.num_blocks, spec.block_size)
        self._kv_window = runner.spec.kv_window  # every layer slides: older blocks go back as sequences run
        self.num_blocks_returned = 0  # blocks given back early, wholly outside every layer's window
        self._lock = threading.Condition()
        self._emission = Emission()
        self._in_flight = InFlight()
        self._history = HistorySlots()
        self._seqs = Lifecycle(receiver, self._emission, self._in_flight, self._history, self._lock, replica_id)
        self._overlap = runner.device.type == "cuda" if settings.overlap_steps is None else settings.overlap_steps
        self._transfer_ids = itertools.count(1)
        self._stopped = False
        self._draining = False
        self._clock = StepClock(runner.device)  # device busy time per step beside the step period
        self._host_time = HostTimePerSeq()
        self._waited_s = 0.0  # of this loop turn, spent waiting for the device's tokens
        self._tokens_out = TokenRate()
        self._prefills: deque[tuple[int, float]] = deque(maxlen=32)  # (prompt tokens, seconds) of recent local batches
        self._arrivals = RateMeter(settings.arrival_window_s)
        self._thread = threading.Thread(target=self._loop, name=f"decode-{replica_id}", daemon=True)
        self._thread.start()

    # ---- calls from other threads -------------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int, deadline: float) -> Reservation:
        """Hold blocks for prompt + max_tokens; raises QueueFull, KvPoolFull or ReplicaDraining."""
        with self._lock:
            if self._draining or self._stopped:
                raise ReplicaDraining(f"decode replica {self.replica_id} is draining")
            if self._seqs.num_waiting >= self.settings.max_waiting:
                raise QueueFull(f"decode replica {self.replica_id}: {self.settings.max_waiting} requests waiting")
            table = BlockTable(self.pool)
            try:
                table.ensure_capacity(num_prompt_tokens + max_tokens)
            except NoFreeBlocks as e:
                raise KvPoolFull(f"decode replica {self.replica_id}: {e}") from None
            transfer_id = next(self._transfer_ids)
            self._seqs.add(DecodeSequence(request_id, transfer_id, table, num_prompt_tokens, max_tokens, deadline))
            if self.receiver is not None:
                prompt_blocks = table.block_ids[: self.pool.blocks_for(num_prompt_tokens)]
                self.receiver.expect(transfer_id, prompt_blocks)
                destination = self.receiver.destination(transfer_id, prompt_blocks)
            else:
                destination = None
        self._arrivals.add(num_prompt_tokens)
        log.debug("[%s] reserved %d blocks as transfer %d", request_id, len(table.block_ids), transfer_id)
        return Reservation(transfer_id, destination, self.stream_address, self.replica_id)

    def open(self, start: StreamStart, outbox: Outbox) -> None:
        """Attach a reservation to a subscriber's outbox and start it; never waits for the KV."""
        with self._lock:
            self._seqs.open(start, outbox)
            self._emission.flush()

    def abort(self, transfer_id: int, reason: str = "cancelled") -> None:
        """Drop a request wherever it is (client gone, router gave up); frees its blocks."""
        with self._lock:
            seq = self._seqs.get(transfer_id)
            if seq is not None:
                log.info("[%s] aborted: %s", seq.request_id, reason)
                self._seqs.fail(seq, reason, FailureCode.CANCELLED, notify=False)

    def abort_subscriber(self, outbox: Outbox, reason: str) -> None:
        """Drop every request whose tokens go to `outbox` (its router's stream closed)."""
        with self._lock:
            for seq in [s for s in self._seqs.all() if s.outbox is outbox]:
                self._seqs.fail(seq, reason, FailureCode.CANCELLED, notify=False)
            self._emission.forget(outbox)

    def load(self) -> DecodeLoad:
        steps = self._clock.times()
        arrivals_per_s, prompt_tokens_mean = self._arrivals.rate_and_mean()
        with self._lock:
            running = self._seqs.of(_RUNNING)
            return DecodeLoad(
                replica_id=self.replica_id,
                num_running=len(running),
                num_context_tokens=sum(s.num_tokens for s in running),
                num_waiting=self._seqs.num_waiting,
                num_blocks_free=self.pool.num_free,
                num_blocks_total=self.pool.num_blocks,
                step_time_s=steps.wall_s,
                batch_size=steps.size,
                gpu_step_time_s=steps.step_busy_s,
                gpu_idle_share=steps.idle_share,
                launch_time_s=steps.launch_s,
                max_running=self.settings.max_running,
                tokens_per_s=self._tokens_out.per_s(),
                prefill_tokens_per_s=batch_rate(self._prefills),
                host_s_per_seq=self._host_time.per_seq(),
                arrivals_per_s=arrivals_per_s,
                prompt_tokens_mean=prompt_tokens_mean,
                is_draining=self._draining,
                overlap_steps=self._overlap,
            )

    def drain(self, timeout_s: float) -> bool:
        """Take no new reservations; wait until every held request is done. True if it emptied."""
        end = time.monotonic() + timeout_s
        with self._lock:
            self._draining = True
            while len(self._seqs) and time.monotonic() < end:
                self._lock.wait(timeout=max(end - time.monotonic(), 0))  # woken by every state change
            return not len(self._seqs)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            for seq in self._seqs.all():
                self._seqs.fail(seq, f"decode replica {self.replica_id} is shutting down", FailureCode.UNAVAILABLE)
            self._emission.flush()
            self._lock.notify_all()
        self._thread.join(timeout=5)
        if self.receiver is not None:
            self.receiver.close()

    # ---- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        self.runner.bind_thread()
        while True:
            with self._lock:
                self._expire_and_poll()
                while not (self._stopped or self._seqs.has(_WAITING, _PREFILLING, _RUNNING) or len(self._in_flight)):
                    self._clock.waiting()
                    # A landing is polled, so wait briefly while one is pending.
                    self._lock.wait(timeout=0.001 if self._seqs.has(_LANDING) else 0.1)
                    self._expire_and_poll()
                if self._stopped:
                    return
                turn_started, self._waited_s = time.monotonic(), 0.0
                prefill_batch = prefill_chunks(self._seqs.of(_PREFILLING), self.settings.prefill_chunk_tokens,
                                               self.runner.graph_holds)
                self._seqs.admit(self.settings.max_running)
                self._emission.flush()
            try:
                if prefill_batch:
                    self._run_prefill(prefill_batch)
                launched = self._launch_decode()
                # With overlap the step just queued runs while the host reads the one before it.
                keep = 1 if launched and self._overlap else 0
                while len(self._in_flight) > keep:
                    self._complete(self._in_flight.oldest)
                if launched and not prefill_batch:  # the host's own share of a decode turn
                    self._host_time.add(time.monotonic() - turn_started - self._waited_s, self._seqs.count(_RUNNING))
            except Exception as e:  # a step failing must fail its sequences, not the replica
                log.exception("decode step failed")
                self._fail_all_steps(f"decode step failed: {e}", [s for s, _ in prefill_batch])

    def _expire_and_poll(self) -> None:
        """Fail what passed its deadline, move what landed; tell the failed at once (the loop may
        go on waiting: with nothing else to do, an unflushed ending would wait for the next work)."""
        self._seqs.expire_deadlines()
        if self._seqs.has(_LANDING):
            self._seqs.poll_landings(self.settings.transfer_timeout_s)
        self._emission.flush()

    def _run_prefill(self, batch: list[tuple[DecodeSequence, PrefillChunk]]) -> None:
        started = time.monotonic()
        with self._clock.work():  # the device's time, not a step point
            logits = self.runner.prefill([chunk for _, chunk in batch])
        rows = logit_rows([chunk for _, chunk in batch])
        for (seq, chunk), chunk_rows in zip(batch, rows):
            if chunk.scores_prompt:
                seq.prompt_logprobs += score_chunk(logits[chunk_rows], seq.prompt, chunk, seq.params.prompt_logprobs)
        done_rows = []
        with self._lock:
            for row, (seq, chunk) in enumerate(batch):
                if seq.num_prefilled == 0:
                    seq.queue_s = started - seq.opened_at
                seq.num_prefilled += len(chunk.token_ids)
                if seq.state is _PREFILLING and seq.num_prefilled == seq.num_to_prefill:
                    self._seqs.move(seq, _WAITING)
                    if not seq.generated:
                        done_rows.append((row, seq))
            seqs = [s for _, s in done_rows]
            # Sampling reads the tokens back, so a finishing batch's time is the device's, not the launch's.
            sampled = _sample(logits[[rows[r][-1] for r, _ in done_rows]], seqs) if seqs else None
            elapsed = time.monotonic() - started
            for seq, _ in batch:
                seq.prefill_s += elapsed
            if seqs:  # the batch's time is then the device's (sampling read it back), not only the launch's
                self._prefills.append((sum(len(c.token_ids) for _, c in batch), elapsed))
                for seq in seqs:  # in the first token's message, before it
                    if seq.params.prompt_logprobs is not None:
                        self._emission.prompt_logprobs(seq.outbox, seq.transfer_id, tuple(seq.prompt_logprobs))
                self._accept(sampled, seqs)
            self._emission.flush()

    def _launch_decode(self) -> bool:
        """Queue one decode step over the running sequences; False if none can take a step."""
        with self._lock:
            previous = self._in_flight.newest
            batch, inputs = [], []
            for seq in self._seqs.of(_RUNNING):
                source = previous.rows.get(seq.transfer_id, -1) if previous else -1
                if len(seq.generated) + (source >= 0) >= seq.max_tokens:
                    continue  # its last token is in flight: it finishes when that is read
                batch.append(seq)
                inputs.append(decode_input(seq, source))
            if not batch:
                return False
            histories = self._history.histories(batch, [i.source >= 0 for i in inputs])
            step = Step(batch, {s.transfer_id: row for row, s in enumerate(batch)})
            self._in_flight.push(step)  # before the launch: blocks freed from now on wait for it
        with self._clock.work(len(batch)):
            step.sample = self.runner.decode_and_sample(inputs, [s.params for s in batch], histories)
        return True

    def _complete(self, step: Step) -> None:
        """Read the oldest step's tokens (waiting for that step alone) and hand them out."""
        waiting_from = time.monotonic()
        result = step.sample.result()
        self._waited_s += time.monotonic() - waiting_from
        self._clock.step_done()
        with self._lock:
            self._in_flight.pop_oldest()
            live = [(row, s) for row, s in enumerate(step.seqs) if s.state is _RUNNING]
            if live:  # rows of sequences aborted or finished meanwhile are dropped
                self._accept(result.select([r for r, _ in live]), [s for _, s in live])
            _release_all([step])
            self._emission.flush()

    def _fail_all_steps(self, message: str, prefilling: list[DecodeSequence]) -> None:
        """After a step raised: fail every running and prefilling sequence, forget the steps in flight."""
        with self._lock:
            steps = self._in_flight.clear()
            for seq in self._seqs.of(_RUNNING) + prefilling:
                self._seqs.fail(seq, message, FailureCode.UNAVAILABLE)
            _release_all(steps)
            self._emission.flush()

    def _accept(self, result: SampleResult, seqs: list[DecodeSequence]) -> None:
        """Emit each sequence's sampled token (every `stream_interval`), finish those that stop (lock held)."""
        self._tokens_out.add(len(seqs))
        for seq, token, logprob, top in zip(seqs, result.token_ids, result.logprobs, result.top_logprobs):
            seq.generated.append(token)
            seq.num_steps += 1
            reason = seq.finish_reason()
            if seq.stream_interval == 1:
                self._emission.token(seq.outbox, seq.transfer_id, token, logprob, top)
            else:
                self._hold(seq, (token, logprob, top), flush=bool(reason))
            if reason:
                self._seqs.finish(seq, reason)
            elif self._kv_window is not None:
                self._return_old_blocks(seq)

    def _hold(self, seq: DecodeSequence, sampled: tuple[int, float | None, TopLogprobs], flush: bool) -> None:
        """Keep a token (and its logprobs) back until the sequence has `stream_interval` of them, or ends;
        the request's first token goes at once (TTFT; after a remote prefill the router already sent it)."""
        seq.unsent.append(sampled)
        if flush or len(seq.generated) == 1 or len(seq.unsent) >= seq.stream_interval:
            for token, logprob, top in seq.unsent:
                self._emission.token(seq.outbox, seq.transfer_id, token, logprob, top)
            seq.unsent.clear()

    def _return_old_blocks(self, seq: DecodeSequence) -> None:
        """Blocks before the window of the next query (the last token, at num_tokens - 1): no step reads
        them again, not even the one in flight, whose query is the position of the token just accepted."""
        self.num_blocks_returned += seq.table.release_before(seq.num_tokens - self._kv_window)


def _release_all(steps: list[Step]) -> None:
    """The blocks held back for these steps, back to the pool."""
    for step in steps:
        for table in step.released:
            table.release()


def _sample(logits, seqs: list[DecodeSequence]) -> SampleResult:
    """The first token of each prompt's row of `logits` (waits for the device)."""
    return sample_first(logits, [s.params for s in seqs], [s.prompt for s in seqs], [s.stop_ids for s in seqs])
