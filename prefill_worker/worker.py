"""The prefill worker: batches prompts, computes their KV, pushes it to decode, returns the first token.

A request's life here:

    QUEUED ──▶ RUNNING (one chunk per batch, each layer's KV sent as soon as it is computed)
           ──▶ SENDING (last chunk done: first token sampled, waiting for the transfer to finish)
           ──▶ DONE (result returned, this replica's blocks freed) | FAILED (reason returned)

One engine thread runs batches: waiting prompts in arrival order under a token
budget; a prompt longer than the budget is split into block-aligned chunks
across batches (chunked prefill), its earlier chunks' KV kept in this replica's
blocks. Full blocks of finished prompts stay in a prefix cache: a later prompt
starting with the same tokens computes only the rest (its first chunk also
sends the cached blocks), which is what prefix-aware routing aims at.
Finishing a transfer happens on a separate thread so the next batch's compute
is not held up by the network.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_pool import BlockPool, BlockTable, NoFreeBlocks
from pdserve.engine.failures import FailureCode
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.runner import ModelRunner, PrefillChunk
from pdserve.engine.tp_runner import LayerPush, TpRunner, TransferEnd
from pdserve.engine.sampler import SamplingParams, sample
from pdserve.engine.step_timing import StepClock, StepTimes
from pdserve.engine.transfer.base import KvSender
from pdserve.engine.transfer.messages import KvDestination, TransferError

log = logging.getLogger(__name__)


class PrefillOverloaded(RuntimeError):
    """The prefill queue is full."""


class PrefillFailed(RuntimeError):
    """Prefill or its KV push failed; `code` says how."""

    def __init__(self, message: str, code: FailureCode):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PrefillSettings:
    """No defaults: cluster/settings.py builds it from the config, which holds them."""

    max_batch_tokens: int
    max_queued_requests: int
    transfer_timeout_s: float


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    first_logprob: float | None
    last_layer_at: float  # time.monotonic() when the prompt's KV was computed (system-wide clock on Linux)
    queue_s: float  # arrival to first chunk computed
    prefill_s: float  # compute time of the batches this prompt was in
    transfer_wait_s: float  # last layer computed to transfer finished (what the handoff adds)
    kv_bytes: int
    replica_id: str


class PrefillState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class PrefillJob:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    destination: KvDestination
    deadline: float
    future: Future
    table: BlockTable | None = None
    num_done: int = 0  # prompt tokens whose KV is computed (or was found in the prefix cache)
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    state: PrefillState = PrefillState.QUEUED
    arrived_at: float = field(default_factory=time.monotonic)
    first_chunk_at: float = 0.0
    compute_s: float = 0.0


class PrefillWorker:
    def __init__(self, runner: ModelRunner | TpRunner, sender: KvSender, settings: PrefillSettings, replica_id: str):
        """`runner`: a TP replica's leader passes its `TpRunner` (the followers push their own heads)."""
        self.runner = runner if isinstance(runner, TpRunner) else TpRunner(runner, sender)
        self.sender = sender
        self.settings = settings
        self.replica_id = replica_id
        spec = runner.kv_cache.spec
        self.pool = BlockPool(spec.num_blocks, spec.block_size)
        self.prefix_cache = PrefixCache(self.pool)
        self._prompt_tokens = self._cached_tokens = 0  # since start: the prefix cache's hit rate
        self._queue: deque[PrefillJob] = deque()
        self._lock = threading.Condition()
        self._stopped = False
        self._draining = False
        self._finisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-finish")
        self._rates: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens, seconds) of recent batches
        self._clock = StepClock(runner.device)  # device busy time per batch beside the batch period
        self._thread = threading.Thread(target=self._loop, name=f"prefill-{replica_id}", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               destination: KvDestination, deadline: float) -> Future:
        """Queue a prompt; the future resolves to a PrefillResult or raises PrefillFailed."""
        if not prompt:
            raise PrefillFailed("empty prompt", FailureCode.INVALID)
        if not destination.channels:
            raise PrefillFailed("no KV destination", FailureCode.INVALID)
        job = PrefillJob(request_id, tuple(prompt), params, destination, deadline, Future())
        with self._lock:
            if self._stopped or self._draining:
                raise PrefillOverloaded(f"prefill replica {self.replica_id} is draining")
            if len(self._queue) >= self.settings.max_queued_requests:
                raise PrefillOverloaded(f"prefill replica {self.replica_id}: queue full")
            self._queue.append(job)
            self._lock.notify()
        return job.future

    def queued_tokens(self) -> int:
        with self._lock:
            return sum(len(j.prompt) - j.num_done for j in self._queue)

    def queued_requests(self) -> int:
        with self._lock:
            return len(self._queue)

    def prefix_hit_rate(self) -> float:
        """Share of the prompt tokens started so far whose KV the prefix cache held."""
        with self._lock:
            return self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0

    def tokens_per_s(self) -> float:
        with self._lock:
            tokens, seconds = sum(t for t, _ in self._rates), sum(s for _, s in self._rates)
        return tokens / seconds if seconds > 0 else 0.0

    def batch_times(self) -> StepTimes:
        """Device busy time per batch beside the batch period, and the device's idle share."""
        return self._clock.times()

    def drain(self, timeout_s: float) -> bool:
        """Take no new prompts; finish the queued ones. True if the queue emptied in time."""
        end = time.monotonic() + timeout_s
        with self._lock:
            self._draining = True
            while self._queue and time.monotonic() < end:
                self._lock.wait(timeout=0.1)
            return not self._queue

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            for job in self._queue:
                self._fail(job, f"prefill replica {self.replica_id} is shutting down", FailureCode.UNAVAILABLE)
            self._queue.clear()
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    # ---- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        self.runner.bind_thread()
        while True:
            with self._lock:
                while not self._stopped and not self._queue:
                    self._clock.waiting()
                    self._lock.wait(timeout=0.1)
                if self._stopped:
                    return
                batch = self._next_batch()
            if batch:
                self._run(batch)
            else:
                self._clock.waiting()  # waiting for decode to take KV is not host time
                time.sleep(0.005)  # no blocks free: wait for transfers to finish

    def _next_batch(self) -> list[tuple[PrefillJob, PrefillChunk]]:
        """Chunks for queued jobs in order, under the token budget (lock held)."""
        budget, batch, now = self.settings.max_batch_tokens, [], time.time()
        for job in list(self._queue):
            if job.deadline < now:
                self._queue.remove(job)
                self._fail(job, "the request's deadline passed before prefill", FailureCode.DEADLINE)
                continue
            if budget <= 0:
                break
            if job.table is None:
                job.table, job.num_cached = self._table_for(job.prompt)
                if job.table is None:
                    break  # keep arrival order: wait for blocks
                job.num_done = job.num_cached
                job.state = PrefillState.RUNNING
                self._prompt_tokens += len(job.prompt)
                self._cached_tokens += job.num_cached
            end = min(len(job.prompt), job.num_done + budget)
            batch.append((job, PrefillChunk(job.prompt[job.num_done:end], job.num_done, tuple(job.table.block_ids))))
            budget -= end - job.num_done
        return batch

    def _table_for(self, prompt: tuple[int, ...]) -> tuple[BlockTable | None, int]:
        """Blocks for a prompt, its cached prefix shared and the rest allocated, and the number of
        prompt tokens cached; (None, 0) while the pool has no room.

        At least the last token is always computed: its logits give the first token.
        """
        table = BlockTable(self.pool, self.prefix_cache.match(prompt, (len(prompt) - 1) // self.pool.block_size))
        num_cached = table.num_tokens
        missing = self.pool.blocks_for(len(prompt)) - len(table.block_ids)
        self.prefix_cache.evict(missing - self.pool.num_free)
        try:
            table.ensure_capacity(len(prompt))
        except NoFreeBlocks:
            table.release()
            return None, 0
        return table, num_cached

    def _run(self, batch: list[tuple[PrefillJob, PrefillChunk]]) -> None:
        block_size = self.pool.block_size
        pushes, ends = [], []
        for job, chunk in batch:
            # a job's first chunk also carries its cached prefix, which the decode side lacks
            first = 0 if chunk.start_pos == job.num_cached else chunk.start_pos // block_size
            last = -(-(chunk.start_pos + len(chunk.token_ids)) // block_size)
            pushes.append(LayerPush(job.destination, tuple(job.table.block_ids[first:last]), first))
            if chunk.start_pos + len(chunk.token_ids) == len(job.prompt):  # TP followers finish their heads
                ends.append(TransferEnd(job.destination, self.pool.blocks_for(len(job.prompt)), self._timeout(job)))

        started = time.monotonic()
        try:
            with self._clock.work(sum(len(c.token_ids) for _, c in batch)):
                logits = self.runner.prefill([chunk for _, chunk in batch], pushes, ends)
            _wait_for_device(logits)
            self._clock.step_done()
        except (TransferError, RuntimeError) as e:
            log.exception("prefill batch failed")
            with self._lock:
                for job, _ in batch:
                    self._queue.remove(job)
                    self._fail(job, f"prefill failed: {e}", FailureCode.TRANSFER_FAILED if isinstance(e, TransferError) else FailureCode.UNAVAILABLE)
                    # finish() on an incomplete transfer tells the receiver at once that it failed.
                    self._finisher.submit(self._abandon_transfer, job.destination)
            return
        elapsed = time.monotonic() - started
        with self._lock:
            self._rates.append((sum(len(c.token_ids) for _, c in batch), elapsed))
            done = []
            for row, (job, chunk) in enumerate(batch):
                job.num_done += len(chunk.token_ids)
                job.compute_s += elapsed
                job.first_chunk_at = job.first_chunk_at or started
                if job.num_done == len(job.prompt):
                    self._queue.remove(job)
                    job.state = PrefillState.SENDING
                    self.prefix_cache.insert(job.prompt, job.table.block_ids)
                    done.append((row, job))
            self._lock.notify_all()
        if done:
            rows = [row for row, _ in done]
            jobs = [job for _, job in done]
            result = sample(logits[rows], [j.params for j in jobs], [len(j.prompt) for j in jobs])
            for job, token, logprob in zip(jobs, result.token_ids, result.logprobs):
                self._finisher.submit(self._finish_transfer, job, token, logprob, time.monotonic())

    def _finish_transfer(self, job: PrefillJob, token: int, logprob: float | None, computed_at: float) -> None:
        num_blocks = self.pool.blocks_for(len(job.prompt))
        try:
            self.sender.finish(job.destination, num_blocks, self._timeout(job))
        except TransferError as e:
            with self._lock:
                self._fail(job, f"KV transfer failed: {e}", FailureCode.TRANSFER_FAILED)
            return
        wait = time.monotonic() - computed_at
        with self._lock:
            job.state = PrefillState.DONE
            job.table.release()
        job.future.set_result(PrefillResult(
            request_id=job.request_id, first_token=token, first_logprob=logprob, last_layer_at=computed_at,
            queue_s=job.first_chunk_at - job.arrived_at, prefill_s=job.compute_s, transfer_wait_s=wait,
            kv_bytes=num_blocks * self.runner.kv_cache.spec.bytes_per_block, replica_id=self.replica_id,
        ))

    def _timeout(self, job: PrefillJob) -> float:
        return max(0.0, min(job.deadline - time.time(), self.settings.transfer_timeout_s))

    def _abandon_transfer(self, destination: KvDestination) -> None:
        try:
            self.sender.finish(destination, len(destination.block_ids), timeout_s=1.0)
        except TransferError:
            pass  # expected: the transfer was incomplete

    def _fail(self, job: PrefillJob, message: str, code: FailureCode) -> None:
        """Fail a job that is no longer queued (lock held); frees its blocks."""
        job.state = PrefillState.FAILED
        if job.table is not None:
            job.table.release()
            job.table = None
        if not job.future.done():
            job.future.set_exception(PrefillFailed(message, code))


def _wait_for_device(tensor: torch.Tensor) -> None:
    """Timings mean compute done, not kernels queued: wait for the GPU (a no-op on the CPU)."""
    if tensor.is_cuda:  # this thread's stream only: the KV channels' own streams keep sending
        torch.cuda.current_stream(tensor.device).synchronize()
