"""The router's end of the decode replicas' token streams.

One `Subscription` per decode replica address: a single `Subscribe` stream whose
batches (one per engine step) are split into per-request `Feed`s. A request
registers its feed before it opens its reservation, so no token can arrive
before someone listens; one that reserves and opens in one call learns its
transfer id only from the reply, so while such a call is out (`expecting`) tokens
of unknown transfers are kept for it to claim. A subscription whose stream breaks (replica gone) ends
every feed with `StreamLost`; the next request to that address subscribes anew.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.engine.messages import PromptLogprob, TopLogprobs
from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc

from .channels import Channels

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0


class StreamLost(Exception):
    """The decode replica's stream broke or ended before the request's ending arrived."""


@dataclass
class FeedItem:
    """What a request received since it last looked: tokens, then maybe its ending."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # one per token
    prompt_logprobs: tuple[PromptLogprob, ...] = ()  # with the first token, where a local prefill scored the prompt
    ending: pb.Ending | None = None
    lost: str = ""  # the stream broke: why

    def __bool__(self) -> bool:
        return bool(self.token_ids or self.ending is not None or self.lost)


class Feed:
    """One request's tokens from a subscription, collected until the request reads them."""

    def __init__(self) -> None:
        self._item = FeedItem()
        self._waiter: asyncio.Future | None = None

    def push(self, token_ids: list[int], logprobs: list[float], tops: list[TopLogprobs]) -> None:
        self._item.token_ids += token_ids
        self._item.logprobs += logprobs
        self._item.top_logprobs += tops
        self._wake()

    def score_prompt(self, scored: tuple[PromptLogprob, ...]) -> None:
        """The prompt's logprobs, which come in the first token's message, before it (no wake: it does)."""
        self._item.prompt_logprobs = scored

    def end(self, ending: pb.Ending) -> None:
        self._item.ending = ending
        self._wake()

    def lose(self, why: str) -> None:
        self._item.lost = why
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout_s: float) -> FeedItem:
        """Everything received since the last call; waits at most `timeout_s` (asyncio.TimeoutError)."""
        if not self._item:
            # A future and a timer, not asyncio.wait_for (a task per wait): this runs for every token.
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        item, self._item = self._item, FeedItem()
        return item


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class Subscription:
    """The `Subscribe` stream to one decode replica, demultiplexed by transfer id."""

    def __init__(self, channel: grpc.aio.Channel):
        self.stub = pb_grpc.DecodeStreamStub(channel)
        self.subscriber_id = uuid.uuid4().hex
        self.is_alive = True
        self._feeds: dict[int, Feed] = {}
        self._unclaimed: set[int] = set()  # feeds made for tokens that came before their call's reply
        self._expecting = 0  # reserve-and-open calls out
        self._registered = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self) -> None:
        """Until the replica has registered this subscription (its first, empty message)."""
        await asyncio.wait_for(asyncio.shield(self._registered), timeout=SUBSCRIBE_TIMEOUT_S)

    def feed(self, transfer_id: int) -> Feed:
        if transfer_id in self._unclaimed:
            self._unclaimed.discard(transfer_id)
            return self._feeds[transfer_id]
        feed = self._feeds[transfer_id] = Feed()
        if not self.is_alive:
            feed.lose("the decode replica's stream is closed")
        return feed

    @contextlib.contextmanager
    def expecting(self):
        """Around a call that opens a request whose transfer id comes back with its reply:
        claim the request's feed (`feed`) inside it."""
        self._expecting += 1
        try:
            yield
        finally:
            self._expecting -= 1
            if not self._expecting:  # every such call claimed its own: the rest belong to no one
                for transfer_id in self._unclaimed:
                    self._feeds.pop(transfer_id, None)
                self._unclaimed.clear()

    def forget(self, transfer_id: int) -> None:
        self._feeds.pop(transfer_id, None)

    async def _run(self) -> None:
        why = "the decode replica ended its stream"
        call = self.stub.Subscribe(pb.SubscribeRequest(subscriber_id=self.subscriber_id))
        try:
            async for batch in call:
                if not self._registered.done():
                    self._registered.set_result(None)
                self._dispatch(batch)
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            why = "the router closed the stream"
            call.cancel()
        finally:
            self.is_alive = False
            if not self._registered.done():
                self._registered.set_exception(StreamLost(why))
            for feed in self._feeds.values():
                feed.lose(why)
            self._feeds.clear()

    def _dispatch(self, batch: pb.TokenBatch) -> None:
        # grouped first: a request wakes once per message, also when merged steps gave it several tokens
        for scored in batch.prompt_logprobs:
            feed = self._feeds.get(scored.transfer_id) or self._early(scored.transfer_id)
            if feed is not None:
                feed.score_prompt(_prompt_logprobs(scored))
        grouped: dict[int, tuple[list[int], list[float], list[TopLogprobs]]] = {}
        for tid, token, lp, top in zip(batch.transfer_ids, batch.token_ids, batch.logprobs, _alternatives(batch)):
            entry = grouped.setdefault(tid, ([], [], []))
            entry[0].append(token)
            entry[1].append(lp)
            entry[2].append(top)
        for tid, (tokens, logprobs, tops) in grouped.items():
            feed = self._feeds.get(tid) or self._early(tid)
            if feed is not None:
                feed.push(tokens, logprobs, tops)
        for ending in batch.endings:
            tid = ending.transfer_id
            feed = self._feeds.get(tid) if tid in self._unclaimed else self._feeds.pop(tid, None) or self._early(tid)
            if feed is not None:
                feed.end(ending)

    def _early(self, transfer_id: int) -> Feed | None:
        """A feed for a transfer no one listens to yet, while a call that may claim it is out."""
        if not self._expecting:
            return None
        self._unclaimed.add(transfer_id)
        feed = self._feeds[transfer_id] = Feed()
        return feed

    def close(self) -> None:
        self._task.cancel()


def _alternatives(batch: pb.TokenBatch) -> list[TopLogprobs]:
    """Each token's alternatives, from the message's flattened columns (none where `num_top` is empty)."""
    if not batch.num_top:
        return [()] * len(batch.token_ids)
    tops, start = [], 0
    ids, values = batch.top_token_ids, batch.top_logprobs
    for count in batch.num_top:
        tops.append(tuple(zip(ids[start:start + count], values[start:start + count])))
        start += count
    return tops


def _prompt_logprobs(message: pb.PromptLogprobs) -> tuple[PromptLogprob, ...]:
    n, ids, values = message.num_top, message.top_token_ids, message.top_logprobs
    return tuple(PromptLogprob(token, logprob, rank, tuple(zip(ids[i * n:(i + 1) * n], values[i * n:(i + 1) * n])))
                 for i, (token, logprob, rank) in enumerate(zip(message.token_ids, message.logprobs, message.ranks)))


class DecodeStreams:
    """The router process's subscriptions, one per decode replica address, made on first use."""

    def __init__(self, channels: Channels) -> None:
        self._channels = channels
        self._subscriptions: dict[str, Subscription] = {}

    async def subscription(self, address: str) -> Subscription:
        """The live subscription to `address`, subscribing (again) if there is none."""
        subscription = self._subscriptions.get(address)
        if subscription is None or not subscription.is_alive:
            subscription = self._subscriptions[address] = Subscription(self._channels.get(address))
        await subscription.ready()
        return subscription
