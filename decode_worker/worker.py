"""The decode worker: KV reservations, admission, and continuous batching.

One engine thread owns the model and loops: admit sequences whose KV landed,
advance local prefills by one chunk under the token budget, then one decode
step over every running sequence. Other threads (Ray calls, the gRPC stream
server) talk to it through `reserve`, `open` and `abort`, all under one lock;
none of them waits for the engine (a KV landing is polled by the loop, not
waited for on a thread). Tokens leave through each sequence's subscriber
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
from dataclasses import dataclass, field

from pdserve.engine.block_pool import BlockPool, BlockTable, NoFreeBlocks
from pdserve.engine.failures import FailureCode
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import PendingSample, SampleResult, SamplingParams, sample
from pdserve.engine.step_timing import StepClock
from pdserve.engine.transfer.base import KvReceiver

from .messages import DecodeLoad, KvPoolFull, QueueFull, ReplicaDraining, Reservation
from .outbox import Ending, Outbox
from .sequence import DecodeSequence, SequenceState

log = logging.getLogger(__name__)


def decode_input(seq: DecodeSequence, source: int = -1) -> DecodeInput:
    """A sequence's row of a decode step: its last token, at its position, over its blocks.

    `source` >= 0: the last token is the one the step in flight samples in that row,
    not yet on the host; it sits one position past the host's last token."""
    if source < 0:
        return DecodeInput(seq.generated[-1], seq.num_tokens - 1, seq.block_ids)
    return DecodeInput(0, seq.num_tokens, seq.block_ids, source)


@dataclass(frozen=True)
class DecodeSettings:
    max_running: int = 64
    max_waiting: int = 256
    prefill_chunk_tokens: int = 512  # local prefill budget per step (colocated, short prompts, failover)
    transfer_timeout_s: float = 30.0
    overlap_steps: bool | None = None  # queue step N+1 before reading step N's tokens; None: on CUDA


@dataclass(frozen=True)
class StreamStart:
    """What the router sends when it opens a reservation's stream (the StreamRequest proto, as data)."""

    transfer_id: int
    request_id: str
    prompt: tuple[int, ...]
    generated: tuple[int, ...]
    prefill_locally: bool
    max_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    deadline: float


@dataclass
class _Step:
    """A decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[DecodeSequence]
    rows: dict[int, int]  # transfer id -> row
    sample: PendingSample | None = None
    released: list[BlockTable] = field(default_factory=list)  # freed while this step might write them


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
        self._sequences: dict[int, DecodeSequence] = {}
        self._ready: deque[DecodeSequence] = deque()  # WAITING or PREFILLING, in arrival order
        self._landing: list[DecodeSequence] = []  # LANDING: the loop polls their transfers
        self._unflushed: set[Outbox] = set()  # outboxes written since the last flush
        self._running: list[DecodeSequence] = []
        self._in_flight: deque[_Step] = deque()  # oldest first; at most two, for a moment
        self._overlap = runner.device.type == "cuda" if settings.overlap_steps is None else settings.overlap_steps
        self._transfer_ids = itertools.count(1)
        self._lock = threading.Condition()
        self._stopped = False
        self._draining = False
        self._clock = StepClock(runner.device)  # device busy time per step beside the step period
        self._host_stats: deque[tuple[float, int]] = deque(maxlen=64)  # (host seconds of a loop turn, batch size)
        self._waited_s = 0.0  # of this loop turn, spent waiting for the device's tokens
        self._tokens_out: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens)
        self._thread = threading.Thread(target=self._loop, name=f"decode-{replica_id}", daemon=True)
        self._thread.start()

    # ---- calls from other threads -------------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int, deadline: float) -> Reservation:
        """Hold blocks for prompt + max_tokens; raises QueueFull, KvPoolFull or ReplicaDraining."""
        with self._lock:
            if self._draining or self._stopped:
                raise ReplicaDraining(f"decode replica {self.replica_id} is draining")
            if self._num_waiting() >= self.settings.max_waiting:
                raise QueueFull(f"decode replica {self.replica_id}: {self.settings.max_waiting} requests waiting")
            table = BlockTable(self.pool)
            try:
                table.ensure_capacity(num_prompt_tokens + max_tokens)
            except NoFreeBlocks as e:
                raise KvPoolFull(f"decode replica {self.replica_id}: {e}") from None
            transfer_id = next(self._transfer_ids)
            seq = DecodeSequence(request_id, transfer_id, table, num_prompt_tokens, max_tokens, deadline)
            self._sequences[transfer_id] = seq
            if self.receiver is not None:
                prompt_blocks = table.block_ids[: self.pool.blocks_for(num_prompt_tokens)]
                self.receiver.expect(transfer_id, prompt_blocks)
                destination = self.receiver.destination(transfer_id, prompt_blocks)
            else:
                destination = None
            self._lock.notify()
        log.debug("[%s] reserved %d blocks as transfer %d", request_id, len(table.block_ids), transfer_id)
        return Reservation(transfer_id, destination, self.stream_address, self.replica_id)

    def open(self, start: StreamStart, outbox: Outbox) -> None:
        """Attach a reservation to a subscriber's outbox and start it; never waits for the KV."""
        with self._lock:
            self._open(start, outbox)
            self._flush()

    def _open(self, start: StreamStart, outbox: Outbox) -> None:
        seq = self._sequences.get(start.transfer_id)
        if seq is None or seq.state is not SequenceState.RESERVED:
            outbox.end(Ending(start.transfer_id, error=f"no open reservation {start.transfer_id} on {self.replica_id}",
                              error_code=FailureCode.INVALID))
            self._unflushed.add(outbox)
            return
        seq.outbox = outbox
        if len(start.prompt) > seq.num_prompt_tokens or start.max_tokens > seq.max_tokens + len(start.generated):
            self._fail(seq, "the stream asks for more tokens than were reserved", FailureCode.INVALID)
            return
        seq.prompt, seq.generated = list(start.prompt), list(start.generated)
        seq.params, seq.stop_ids, seq.max_tokens = start.params, start.stop_ids, start.max_tokens
        seq.deadline, seq.opened_at = min(seq.deadline, start.deadline), time.monotonic()
        if seq.generated and seq.finish_reason():  # prefill's first token already ends it
            self._cancel_transfer(seq)
            self._finish(seq, seq.finish_reason())
        elif start.prefill_locally:
            self._cancel_transfer(seq)
            seq.state = SequenceState.PREFILLING
            self._make_ready(seq)
        else:
            seq.state = SequenceState.LANDING
            self._landing.append(seq)
            self._lock.notify()

    def abort(self, transfer_id: int, reason: str = "cancelled") -> None:
        """Drop a request wherever it is (client gone, router gave up); frees its blocks."""
        with self._lock:
            seq = self._sequences.get(transfer_id)
            if seq is not None:
                log.info("[%s] aborted: %s", seq.request_id, reason)
                self._fail(seq, reason, FailureCode.CANCELLED, notify=False)

    def abort_subscriber(self, outbox: Outbox, reason: str) -> None:
        """Drop every request whose tokens go to `outbox` (its router's stream closed)."""
        with self._lock:
            for seq in [s for s in self._sequences.values() if s.outbox is outbox]:
                self._fail(seq, reason, FailureCode.CANCELLED, notify=False)
            self._unflushed.discard(outbox)

    def load(self) -> DecodeLoad:
        steps = self._clock.times()
        with self._lock:
            return DecodeLoad(
                replica_id=self.replica_id,
                num_running=len(self._running),
                num_context_tokens=sum(s.num_tokens for s in self._running),
                num_waiting=self._num_waiting(),
                num_blocks_free=self.pool.num_free,
                num_blocks_total=self.pool.num_blocks,
                step_time_s=steps.wall_s,
                batch_size=steps.size,
                gpu_step_time_s=steps.step_busy_s,
                gpu_idle_share=steps.idle_share,
                launch_time_s=steps.launch_s,
                max_running=self.settings.max_running,
                tokens_per_s=self._tokens_per_s(),
                host_s_per_seq=_per_seq(self._host_stats),
                is_draining=self._draining,
                overlap_steps=self._overlap,
            )

    def drain(self, timeout_s: float) -> bool:
        """Take no new reservations; wait until every held request is done. True if it emptied."""
        end = time.monotonic() + timeout_s
        with self._lock:
            self._draining = True
            while self._sequences and time.monotonic() < end:
                self._lock.wait(timeout=min(0.1, max(end - time.monotonic(), 0)))
            return not self._sequences

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            for seq in list(self._sequences.values()):
                self._fail(seq, f"decode replica {self.replica_id} is shutting down", FailureCode.UNAVAILABLE)
            self._flush()
            self._lock.notify_all()
        self._thread.join(timeout=5)
        if self.receiver is not None:
            self.receiver.close()

    # ---- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        self.runner.bind_thread()
        while True:
            with self._lock:
                self._expire_deadlines()
                self._poll_landings()
                while not (self._stopped or self._ready or self._running or self._in_flight):
                    self._clock.waiting()
                    # A landing is polled, so wait briefly while one is pending.
                    self._lock.wait(timeout=0.001 if self._landing else 0.1)
                    self._expire_deadlines()
                    self._poll_landings()
                if self._stopped:
                    return
                turn_started, self._waited_s = time.monotonic(), 0.0
                prefill_batch = self._take_prefill_chunks()
                self._admit_ready()
                self._flush()
            try:
                if prefill_batch:
                    self._run_prefill(prefill_batch)
                launched = self._launch_decode()
                # With overlap the step just queued runs while the host reads the one before it.
                keep = 1 if launched and self._overlap else 0
                while len(self._in_flight) > keep:
                    self._complete(self._in_flight[0])
                if launched and not prefill_batch:  # the host's own share of a decode turn
                    self._host_stats.append((time.monotonic() - turn_started - self._waited_s, len(self._running)))
            except Exception as e:  # a step failing must fail its sequences, not the replica
                log.exception("decode step failed")
                self._fail_all_steps(f"decode step failed: {e}", [s for s, _ in prefill_batch])

    def _take_prefill_chunks(self) -> list[tuple[DecodeSequence, PrefillChunk]]:
        """One chunk for each PREFILLING sequence, in order, under the step's token budget."""
        budget, batch = self.settings.prefill_chunk_tokens, []
        for seq in self._ready:
            if seq.state is not SequenceState.PREFILLING or budget <= 0:
                continue
            tokens = seq.tokens[: seq.num_to_prefill]
            end = min(len(tokens), seq.num_prefilled + budget)
            chunk = PrefillChunk(tuple(tokens[seq.num_prefilled:end]), seq.num_prefilled, seq.block_ids)
            batch.append((seq, chunk))
            budget -= len(chunk.token_ids)
        return batch

    def _run_prefill(self, batch: list[tuple[DecodeSequence, PrefillChunk]]) -> None:
        started = time.monotonic()
        with self._clock.work():  # the device's time, not a step point
            logits = self.runner.prefill([chunk for _, chunk in batch])
        elapsed = time.monotonic() - started
        done_rows = []
        with self._lock:
            for row, (seq, chunk) in enumerate(batch):
                seq.num_prefilled += len(chunk.token_ids)
                seq.prefill_s += elapsed
                if seq.state is SequenceState.PREFILLING and seq.num_prefilled == seq.num_to_prefill:
                    seq.state = SequenceState.WAITING
                    if not seq.generated:
                        done_rows.append((row, seq))
            if done_rows:
                seqs = [s for _, s in done_rows]
                self._accept(_sample(logits[[r for r, _ in done_rows]], seqs), seqs)
            self._flush()

    def _admit_ready(self) -> None:
        while self._ready and len(self._running) < self.settings.max_running:
            seq = self._ready[0]
            if seq.state is not SequenceState.WAITING:
                if seq.state in (SequenceState.FINISHED, SequenceState.FAILED, SequenceState.RUNNING):
                    self._ready.popleft()
                    continue
                break  # still prefilling: keep arrival order
            self._ready.popleft()
            seq.state, seq.admitted_at = SequenceState.RUNNING, time.monotonic()
            self._running.append(seq)

    def _launch_decode(self) -> bool:
        """Queue one decode step over the running sequences; False if none can take a step."""
        with self._lock:
            previous = self._in_flight[-1] if self._in_flight else None
            batch, inputs = [], []
            for seq in self._running:
                source = previous.rows.get(seq.transfer_id, -1) if previous else -1
                if len(seq.generated) + (source >= 0) >= seq.max_tokens:
                    continue  # its last token is in flight: it finishes when that is read
                batch.append(seq)
                inputs.append(decode_input(seq, source))
            if not batch:
                return False
            step = _Step(batch, {s.transfer_id: row for row, s in enumerate(batch)})
            self._in_flight.append(step)  # before the launch: blocks freed from now on wait for it
        with self._clock.work(len(batch)):
            step.sample = self.runner.decode_and_sample(inputs, [s.params for s in batch])
        return True

    def _complete(self, step: _Step) -> None:
        """Read the oldest step's tokens (waiting for that step alone) and hand them out."""
        waiting_from = time.monotonic()
        result = step.sample.result()
        self._waited_s += time.monotonic() - waiting_from
        self._clock.step_done()
        with self._lock:
            self._in_flight.popleft()
            live = [(row, s) for row, s in enumerate(step.seqs) if s.state is SequenceState.RUNNING]
            if live:  # rows of sequences aborted or finished meanwhile are dropped
                self._accept(result.select([r for r, _ in live]), [s for _, s in live])
            for table in step.released:
                table.release()
            self._flush()

    def _fail_all_steps(self, message: str, prefilling: list[DecodeSequence]) -> None:
        """After a step raised: fail every running and prefilling sequence, forget the steps in flight."""
        with self._lock:
            steps = list(self._in_flight)
            self._in_flight.clear()
            for seq in self._running + prefilling:
                self._fail(seq, message, FailureCode.UNAVAILABLE)
            for step in steps:
                for table in step.released:
                    table.release()
            self._flush()

    def _accept(self, result: SampleResult, seqs: list[DecodeSequence]) -> None:
        """Emit each sequence's sampled token, finish those that stop (lock held)."""
        now = time.monotonic()
        self._tokens_out.append((now, len(seqs)))
        for seq, token, logprob in zip(seqs, result.token_ids, result.logprobs):
            seq.generated.append(token)
            seq.num_steps += 1
            seq.outbox.token(seq.transfer_id, token, logprob)
            self._unflushed.add(seq.outbox)
            reason = seq.finish_reason()
            if reason:
                self._finish(seq, reason)
            elif self._kv_window is not None:
                self._return_old_blocks(seq)

    def _return_old_blocks(self, seq: DecodeSequence) -> None:
        """Blocks before the window of the next query (the last token, at num_tokens - 1): no step reads
        them again, not even the one in flight, whose query is the token just accepted's position."""
        self.num_blocks_returned += seq.table.release_before(seq.num_tokens - self._kv_window)

    # ---- state changes (lock held) --------------------------------------------------

    def _poll_landings(self) -> None:
        """Move each LANDING sequence whose KV landed to WAITING; fail those whose transfer failed or timed out."""
        if not self._landing:
            return
        now, still = time.monotonic(), []
        for seq in self._landing:
            if seq.state is not SequenceState.LANDING:
                continue  # aborted or expired meanwhile
            outcome = self.receiver.poll(seq.transfer_id)
            if outcome is None and now - seq.opened_at > self.settings.transfer_timeout_s:
                outcome = self.receiver.wait(seq.transfer_id, 0.0)
            if outcome is None:
                still.append(seq)
                continue
            seq.kv_wait_s = now - seq.opened_at
            if not outcome.is_ok:
                self._fail(seq, f"KV transfer failed: {outcome.reason.value}: {outcome.detail}", FailureCode.TRANSFER_FAILED)
                continue
            seq.num_prefilled = seq.num_prompt_tokens
            seq.state = SequenceState.WAITING
            self._make_ready(seq)
        self._landing = still

    def _make_ready(self, seq: DecodeSequence) -> None:
        self._ready.append(seq)
        self._lock.notify()

    def _flush(self) -> None:
        """Hand every outbox written since the last flush its batch (lock held)."""
        for outbox in self._unflushed:
            outbox.flush()
        self._unflushed.clear()

    def _cancel_transfer(self, seq: DecodeSequence) -> None:
        if self.receiver is not None:
            self.receiver.cancel(seq.transfer_id)

    def _finish(self, seq: DecodeSequence, reason: str) -> None:
        seq.state = SequenceState.FINISHED
        decode_s = time.monotonic() - seq.admitted_at if seq.admitted_at else 0.0
        timings = {"kv_wait_s": seq.kv_wait_s, "prefill_s": seq.prefill_s, "decode_s": decode_s,
                   "decode_steps": seq.num_steps}
        self._end(seq, Ending(seq.transfer_id, finish_reason=reason, timings=timings))
        self._release(seq)

    def _end(self, seq: DecodeSequence, ending: Ending) -> None:
        if seq.outbox is not None:
            seq.outbox.end(ending)
            self._unflushed.add(seq.outbox)

    def _fail(self, seq: DecodeSequence, message: str, code: FailureCode, notify: bool = True) -> None:
        """End a sequence with an error (told to its subscriber unless `notify` is False) and free its blocks."""
        if seq.state in (SequenceState.FINISHED, SequenceState.FAILED):
            return
        was_landing = seq.state in (SequenceState.RESERVED, SequenceState.LANDING)
        seq.state = SequenceState.FAILED
        if notify:
            self._end(seq, Ending(seq.transfer_id, error=message, error_code=code))
        if was_landing:
            self._cancel_transfer(seq)
        self._release(seq)

    def _release(self, seq: DecodeSequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if self._sequences.pop(seq.transfer_id, None) is not None:
            if any(seq.transfer_id in step.rows for step in self._in_flight):
                # A queued step may still write its KV: another sequence gets the blocks after it.
                self._in_flight[-1].released.append(seq.table)
            else:
                seq.table.release()
        self._lock.notify_all()

    def _expire_deadlines(self) -> None:
        now = time.time()
        for seq in [s for s in self._sequences.values() if s.deadline < now]:
            self._fail(seq, "the request's deadline passed", FailureCode.DEADLINE)

    def _num_waiting(self) -> int:
        return len(self._sequences) - len(self._running)

    def _tokens_per_s(self) -> float:
        samples = list(self._tokens_out)
        if len(samples) < 2:
            return 0.0
        span = samples[-1][0] - samples[0][0]
        return sum(n for _, n in samples[1:]) / span if span > 0 else 0.0


def _per_seq(samples: deque[tuple[float, int]]) -> float:
    """Seconds per running sequence, over recent (seconds, sequences) samples."""
    total = sum(n for _, n in samples)
    return sum(t for t, _ in samples) / total if total else 0.0


def _sample(logits, seqs: list[DecodeSequence]) -> SampleResult:
    """One token for each sequence's row of `logits` (waits for the device)."""
    return sample(logits, [s.params for s in seqs], [s.num_tokens for s in seqs])
