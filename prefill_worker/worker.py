"""The prefill worker: batches prompts, computes their KV, pushes it to decode, returns the first token.

A request's life here (`PrefillState`, changed only by `PrefillWorker._move`):

    QUEUED ──blocks allocated──▶ RUNNING ──last chunk computed──▶ SENDING ──transfer finished──▶ DONE
      │                           │                                │
      │ deadline · shutdown       │ deadline · shutdown ·          │ transfer failed
      │                           │ the batch raised               │ (TRANSFER_FAILED)
      └──────────────────────────▶└───────────▶ FAILED ◀───────────┘

RUNNING computes one chunk per batch and sends each layer's KV as soon as it is
computed; SENDING has sampled the first token and waits for the transfer to finish
(on a finisher thread). QUEUED and RUNNING jobs are the queue, in arrival order;
DONE returns the result and FAILED raises `PrefillFailed` with its `FailureCode`;
both free this replica's blocks (full blocks stay in the prefix cache).

One engine thread runs batches: waiting prompts in arrival order under a token
budget; a prompt longer than the budget is split into block-aligned chunks
across batches (chunked prefill), its earlier chunks' KV kept in this replica's
blocks. Full blocks of finished prompts stay in a prefix cache: a later prompt
starting with the same tokens computes only the rest (its first chunk also
sends the cached blocks), which is what prefix-aware routing aims at. A prompt that asks for
its prompt logprobs reuses no cached prefix (a cached block has no logits) but still fills the
cache; its chunks score every position (engine/prompt_logprobs.py).
Finishing a transfer happens on a separate thread so the next batch's compute
is not held up by the network. When the pool has no room for the next prompt the
engine thread waits on the worker's condition, woken when blocks come back (a
transfer finished or a job failed); it does not sleep-poll.
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
from pdserve.engine.messages import (PrefillLoad, PrefillRequest, PrefillResult, PromptLogprob, SamplingParams,
                                     TopLogprobs)
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.prompt_logprobs import score_chunk
from pdserve.engine.runner import ModelRunner, PrefillChunk, leaves_graphs, logit_rows
from pdserve.engine.tp_runner import LayerPush, TpRunner, TransferEnd
from pdserve.engine.sampler import sample_first
from pdserve.engine.step_timing import StepClock, StepTimes, batch_rate
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
    prefix_caching: bool


class PrefillState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


# The diagram above as data: _move refuses any other edge.
_EDGES = {
    PrefillState.QUEUED: {PrefillState.RUNNING, PrefillState.FAILED},
    PrefillState.RUNNING: {PrefillState.SENDING, PrefillState.FAILED},
    PrefillState.SENDING: {PrefillState.DONE, PrefillState.FAILED},
    PrefillState.DONE: set(),
    PrefillState.FAILED: set(),
}
_QUEUED_STATES = (PrefillState.QUEUED, PrefillState.RUNNING)  # the jobs in the queue


@dataclass
class PrefillJob:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    destination: KvDestination
    deadline: float
    future: Future
    stop_ids: frozenset[int] = frozenset()  # held back below params.min_tokens
    table: BlockTable | None = None
    num_done: int = 0  # prompt tokens whose KV is computed (or was found in the prefix cache)
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    state: PrefillState = PrefillState.QUEUED
    arrived_at: float = field(default_factory=time.monotonic)
    first_chunk_at: float = 0.0
    compute_s: float = 0.0
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # scored so far, when asked

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None


class PrefillWorker:
    def __init__(self, runner: ModelRunner | TpRunner, sender: KvSender, settings: PrefillSettings, replica_id: str):
        """`runner`: a TP replica's leader passes its `TpRunner` (the followers push their own heads)."""
        self.runner = runner if isinstance(runner, TpRunner) else TpRunner(runner, sender)
        self.sender = sender
        self.settings = settings
        self.replica_id = replica_id
        spec = runner.kv_cache.spec
        self.pool = BlockPool(spec.num_blocks, spec.block_size)
        self.prefix_cache = PrefixCache(self.pool, enabled=settings.prefix_caching)
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

    def submit(self, request: PrefillRequest) -> Future:
        """Queue a prompt; the future resolves to a PrefillResult or raises PrefillFailed."""
        if not request.prompt:
            raise PrefillFailed("empty prompt", FailureCode.INVALID)
        if request.destination is None or not request.destination.channels:
            raise PrefillFailed("no KV destination", FailureCode.INVALID)
        job = PrefillJob(request.request_id, tuple(request.prompt), request.sampling, request.destination,
                         request.deadline, Future(), request.stop_ids)
        with self._lock:
            if self._stopped or self._draining:
                raise PrefillOverloaded(f"prefill replica {self.replica_id} is draining")
            if len(self._queue) >= self.settings.max_queued_requests:
                raise PrefillOverloaded(f"prefill replica {self.replica_id}: queue full")
            self._queue.append(job)
            self._lock.notify()
        return job.future

    def load(self) -> PrefillLoad:
        batches = self._clock.times()
        with self._lock:
            return PrefillLoad(
                replica_id=self.replica_id,
                queued_tokens=sum(len(j.prompt) - j.num_done for j in self._queue),
                queued_requests=len(self._queue),
                tokens_per_s=batch_rate(self._rates),
                prefix_hit_rate=self._prefix_hit_rate(),
                prefix_cached_blocks=self.prefix_cache.num_blocks,
                gpu_idle_share=batches.idle_share,
                gpu_batch_time_s=batches.step_busy_s,
                batch_period_s=batches.wall_s,
                batch_tokens=batches.size,
                launch_time_s=batches.launch_s,
            )

    def prefix_hit_rate(self) -> float:
        """Share of the prompt tokens started so far whose KV the prefix cache held."""
        with self._lock:
            return self._prefix_hit_rate()

    def _prefix_hit_rate(self) -> float:
        return self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0

    def batch_times(self) -> StepTimes:
        """Device busy time per batch beside the batch period, and the device's idle share."""
        return self._clock.times()

    def drain(self, timeout_s: float) -> bool:
        """Take no new prompts; finish the queued ones. True if the queue emptied in time."""
        end = time.monotonic() + timeout_s
        with self._lock:
            self._draining = True
            while self._queue and time.monotonic() < end:
                self._lock.wait(timeout=max(end - time.monotonic(), 0))  # woken by every state change
            return not self._queue

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            for job in list(self._queue):
                self._fail(job, f"prefill replica {self.replica_id} is shutting down", FailureCode.UNAVAILABLE)
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    # ---- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        self.runner.bind_thread()
        while True:
            with self._lock:
                batch = self._next_batch()
                while not self._stopped and not batch:
                    # Nothing queued, or no blocks for the next prompt: a submit, a transfer finishing
                    # or a job failing wakes this; the timeout only bounds how late a deadline is seen.
                    self._clock.waiting()  # waiting for decode to take KV is not host time either
                    self._lock.wait(timeout=0.1)
                    batch = self._next_batch()
                if self._stopped:
                    return
            self._run(batch)

    def _next_batch(self) -> list[tuple[PrefillJob, PrefillChunk]]:
        """Chunks for queued jobs in order, under the token budget (lock held); a batch a CUDA graph
        replays stays one (`leaves_graphs`: an eager launch also holds the GIL the KV channels need)."""
        budget, batch, now = self.settings.max_batch_tokens, [], time.time()
        for job in list(self._queue):
            if job.deadline < now:
                self._fail(job, "the request's deadline passed before prefill", FailureCode.DEADLINE)
                continue
            if budget <= 0:
                break
            if job.state is PrefillState.QUEUED:
                job.table, job.num_cached = self._table_for(job.prompt, reuse_prefix=not job.scores_prompt)
                if job.table is None:
                    break  # keep arrival order: wait for blocks
                job.num_done = job.num_cached
                self._move(job, PrefillState.RUNNING)
                self._prompt_tokens += len(job.prompt)
                self._cached_tokens += job.num_cached
            end = min(len(job.prompt), job.num_done + budget)
            chunk = PrefillChunk(job.prompt[job.num_done:end], job.num_done, tuple(job.table.block_ids),
                                 job.scores_prompt)
            if leaves_graphs(self.runner.graph_holds, [c for _, c in batch], chunk):
                break  # the job leads the next batch
            batch.append((job, chunk))
            budget -= end - job.num_done
        return batch

    def _table_for(self, prompt: tuple[int, ...], reuse_prefix: bool) -> tuple[BlockTable | None, int]:
        """Blocks for a prompt, its cached prefix shared and the rest allocated, and the number of
        prompt tokens cached; (None, 0) while the pool has no room.

        At least the last token is always computed: its logits give the first token. A prompt a
        prefill graph holds whole is computed from position 0 instead: the rest of a cached prompt
        runs kernel by kernel, slower than the whole one replayed (Llama-3-8B shape on an H200,
        2026-12-01: 28–34 ms for any cached remainder, 5.9 ms for 128 tokens from a graph).
        """
        whole = self.runner.graph_holds([PrefillChunk(prompt, 0, ())])
        reusable = 0 if whole or not reuse_prefix else (len(prompt) - 1) // self.pool.block_size
        table = BlockTable(self.pool, self.prefix_cache.match(prompt, reusable))
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
                    self._fail(job, f"prefill failed: {e}", FailureCode.TRANSFER_FAILED if isinstance(e, TransferError) else FailureCode.UNAVAILABLE)
                    # finish() on an incomplete transfer tells the receiver at once that it failed.
                    self._finisher.submit(self._abandon_transfer, job.destination)
            return
        rows = logit_rows([chunk for _, chunk in batch])
        for (job, chunk), chunk_rows in zip(batch, rows):
            if chunk.scores_prompt:
                job.prompt_logprobs += score_chunk(logits[chunk_rows], job.prompt, chunk, job.params.prompt_logprobs)
        elapsed = time.monotonic() - started
        with self._lock:
            self._rates.append((sum(len(c.token_ids) for _, c in batch), elapsed))
            done = []
            for row, (job, chunk) in enumerate(batch):
                job.num_done += len(chunk.token_ids)
                job.compute_s += elapsed
                job.first_chunk_at = job.first_chunk_at or started
                if job.state is PrefillState.RUNNING and job.num_done == len(job.prompt):
                    self._move(job, PrefillState.SENDING)
                    self.prefix_cache.insert(job.prompt, job.table.block_ids)
                    done.append((row, job))
        if done:
            jobs = [job for _, job in done]
            result = sample_first(logits[[rows[row][-1] for row, _ in done]], [j.params for j in jobs], [j.prompt for j in jobs],
                                  [j.stop_ids for j in jobs])
            for job, token, logprob, top in zip(jobs, result.token_ids, result.logprobs, result.top_logprobs):
                self._finisher.submit(self._finish_transfer, job, token, logprob, top, time.monotonic())

    def _finish_transfer(self, job: PrefillJob, token: int, logprob: float | None, top: TopLogprobs,
                         computed_at: float) -> None:
        num_blocks = self.pool.blocks_for(len(job.prompt))
        try:
            self.sender.finish(job.destination, num_blocks, self._timeout(job))
        except TransferError as e:
            with self._lock:
                self._fail(job, f"KV transfer failed: {e}", FailureCode.TRANSFER_FAILED)
            return
        wait = time.monotonic() - computed_at
        with self._lock:
            self._move(job, PrefillState.DONE)
        job.future.set_result(PrefillResult(
            request_id=job.request_id, first_token=token, first_logprob=logprob, first_top_logprobs=top,
            prompt_logprobs=tuple(job.prompt_logprobs),
            last_layer_at=computed_at, queue_s=job.first_chunk_at - job.arrived_at, prefill_s=job.compute_s, transfer_wait_s=wait,
            kv_bytes=num_blocks * self.runner.kv_cache.spec.bytes_per_block, replica_id=self.replica_id,
        ))

    def _timeout(self, job: PrefillJob) -> float:
        return max(0.0, min(job.deadline - time.time(), self.settings.transfer_timeout_s))

    def _abandon_transfer(self, destination: KvDestination) -> None:
        try:
            self.sender.finish(destination, len(destination.block_ids), timeout_s=1.0)
        except TransferError:
            pass  # expected: the transfer was incomplete

    def _move(self, job: PrefillJob, state: PrefillState) -> None:
        """The one place a job's state changes (lock held): a job leaving QUEUED/RUNNING leaves the
        queue; DONE and FAILED free its blocks. Every change wakes the engine thread and a drain."""
        if state not in _EDGES[job.state]:
            raise RuntimeError(f"prefill job {job.request_id}: no edge {job.state.name} → {state.name}")
        if job.state in _QUEUED_STATES and state not in _QUEUED_STATES:
            self._queue.remove(job)
        job.state = state
        if state in (PrefillState.DONE, PrefillState.FAILED) and job.table is not None:
            job.table.release()
            job.table = None
        self._lock.notify_all()

    def _fail(self, job: PrefillJob, message: str, code: FailureCode) -> None:
        """End a job with `PrefillFailed` (lock held), wherever it is; frees its blocks."""
        if job.state in (PrefillState.DONE, PrefillState.FAILED):
            return
        self._move(job, PrefillState.FAILED)
        job.future.set_exception(PrefillFailed(message, code))


def _wait_for_device(tensor: torch.Tensor) -> None:
    """Timings mean compute done, not kernels queued: wait for the GPU (a no-op on the CPU)."""
    if tensor.is_cuda:  # this thread's stream only: the KV channels' own streams keep sending
        torch.cuda.current_stream(tensor.device).synchronize()
