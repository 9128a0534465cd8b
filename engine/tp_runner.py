"""Driving every rank of a TP replica through the same steps.

A replica of TP size N has one scheduler (the prefill or decode worker) on its
leader, rank 0; ranks 1..N-1 hold the other shards and run what the leader runs.
The leader's `TpRunner` has the `ModelRunner` verbs the workers call; each verb
first broadcasts its inputs over the TP group (gloo, a few hundred bytes), then
runs on the leader's shard. A follower's `follow` loop receives each step and
runs it on its shard; the model's all-reduces keep the ranks in lockstep.

KV a prefill step pushes is named up front (`LayerPush`): every rank sends its
own kv heads after each layer, through its own sender (engine/transfer/heads.py
says which decode rank gets which heads). A follower finishes its part of the
transfers that a step completes by itself; the decode side's transfer lands
once every prefill rank finished its heads.

A rank that dies breaks the next collective of the others (`CollectiveTimeout`):
the leader's worker fails its requests, and the replica is replaced.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .parallel import CollectiveTimeout
from .runner import DecodeInput, ModelRunner, PrefillChunk
from .penalties import RowHistory
from .sampler import PendingSample, SamplingParams
from .transfer.base import KvSender
from .transfer.messages import KvDestination, TransferError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPush:
    """After each layer of a prefill step: these blocks to `destination.block_ids[first_block_index:]`."""

    destination: KvDestination
    src_block_ids: tuple[int, ...]
    first_block_index: int


@dataclass(frozen=True)
class TransferEnd:
    """A transfer the step completes: every rank finishes its heads of it (`num_blocks_total` blocks)."""

    destination: KvDestination
    num_blocks_total: int
    timeout_s: float


_PREFILL, _DECODE, _DECODE_AND_SAMPLE, _CAPTURE, _STOP = "prefill", "decode", "decode_and_sample", "capture", "stop"


class TpRunner:
    """The leader's runner: `ModelRunner`'s step verbs, each run on every rank of the group."""

    def __init__(self, runner: ModelRunner, sender: KvSender | None = None):
        self.runner, self.tp, self.sender = runner, runner.tp, sender
        self.kv_cache, self.spec, self.device, self.block_size = (
            runner.kv_cache, runner.spec, runner.device, runner.block_size)
        self.broken: CollectiveTimeout | None = None  # the group failed: the replica must be replaced

    def bind_thread(self) -> None:
        self.runner.bind_thread()

    def prefill(self, chunks: list[PrefillChunk], pushes: Sequence[LayerPush] = (),
                ends: Sequence[TransferEnd] = ()) -> torch.Tensor:
        """Logits of each chunk's last token; each layer's KV pushed as `pushes` say.

        `ends`: transfers this step completes, which the followers finish by themselves
        (the leader's caller finishes the leader's part, and learns how it went)."""
        with self._watch():
            self.tp.broadcast((_PREFILL, chunks, tuple(pushes), tuple(ends)))
            return _prefill(self.runner, self.sender, chunks, pushes)

    def graph_holds(self, chunks: list[PrefillChunk]) -> bool:
        return self.runner.graph_holds(chunks)

    def decode(self, inputs: list[DecodeInput]) -> torch.Tensor:
        with self._watch():
            self.tp.broadcast((_DECODE, inputs))
            return self.runner.decode(inputs)

    def decode_and_sample(self, inputs: list[DecodeInput], params: list[SamplingParams],
                          histories: list[RowHistory | None] | None = None) -> PendingSample:
        with self._watch():
            self.tp.broadcast((_DECODE_AND_SAMPLE, inputs, params, histories))
            return self.runner.decode_and_sample(inputs, params, histories)

    def capture_graphs(self, decode: bool = True) -> None:
        with self._watch():
            self.tp.broadcast((_CAPTURE, decode))
            self.runner.capture_graphs(decode)

    @contextlib.contextmanager
    def _watch(self) -> Iterator[None]:
        """Remember a broken group: every later step would fail the same way."""
        if self.broken is not None:
            raise CollectiveTimeout(f"the TP group is broken: {self.broken}")
        try:
            yield
        except CollectiveTimeout as e:
            self.broken = e
            raise

    def stop(self) -> None:
        """End the followers' loops (they return from `follow`)."""
        self.tp.broadcast((_STOP,))


def follow(runner: ModelRunner, sender: KvSender | None = None) -> None:
    """A follower rank's loop: run each step the leader broadcasts, until it says stop.

    Raises `CollectiveTimeout` when the leader or a peer is gone."""
    finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-finish")
    runner.bind_thread()
    try:
        while True:
            command: tuple[Any, ...] = runner.tp.broadcast(idle=True)
            kind = command[0]
            if kind == _STOP:
                return
            if kind == _PREFILL:
                _, chunks, pushes, ends = command
                _prefill(runner, sender, chunks, pushes)
                for end in ends:
                    finisher.submit(_finish, sender, end)
            elif kind == _DECODE:
                runner.decode(command[1])
            elif kind == _DECODE_AND_SAMPLE:
                runner.decode_and_sample(*command[1:])  # inputs, params, histories
            elif kind == _CAPTURE:
                runner.capture_graphs(command[1])
            else:
                raise ValueError(f"unknown TP step {kind!r}")
    finally:
        finisher.shutdown(wait=True)


def _prefill(runner: ModelRunner, sender: KvSender | None, chunks: list[PrefillChunk],
             pushes: Sequence[LayerPush]) -> torch.Tensor:
    def push_layer(layer: int) -> None:
        for push in pushes:
            sender.send_layer(push.destination, layer, push.src_block_ids, push.first_block_index)

    return runner.prefill(chunks, on_layer_done=push_layer if pushes else None)


def _finish(sender: KvSender, end: TransferEnd) -> None:
    try:
        sender.finish(end.destination, end.num_blocks_total, end.timeout_s)
    except TransferError as e:  # the decode side sees the missing heads and fails the transfer
        log.warning("transfer %d: this rank's heads not delivered: %s", end.destination.transfer_id, e)
