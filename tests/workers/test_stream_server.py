"""The decode replica's token streams over real gRPC: one Subscribe stream carries every request
opened on it, a message per engine step, and closing it frees every block its requests held."""
import asyncio
import time

import grpc
import pytest

from pdserve.decode_worker.stream_server import StreamServer
from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.runner import ModelRunner
from pdserve.protos.pdserve.v1 import decode_stream_pb2 as pb
from pdserve.protos.pdserve.v1 import decode_stream_pb2_grpc as pb_grpc
from handoff_helpers import engine_outputs

PROMPTS = [[5, 9, 13], [7] * 11, list(range(2, 30)), [3, 1, 4, 1, 5, 9, 2, 6]]
MAX_TOKENS = 12


@pytest.fixture
def served(loaded):
    worker = DecodeWorker(ModelRunner(loaded, 256, 4), None, decode_settings(load_config()), "decode-stream-test")
    server = StreamServer(worker)
    yield worker, server
    server.stop()
    worker.close()


def stream_request(transfer_id: int, prompt: list[int], subscriber: str, stream_interval: int = 0) -> pb.StreamRequest:
    return pb.StreamRequest(request_id=f"r{transfer_id}", transfer_id=transfer_id, prompt_token_ids=prompt,
                            prefill_locally=True, max_tokens=MAX_TOKENS, top_p=1.0, seed=1,
                            deadline_unix_s=time.time() + 60, subscriber_id=subscriber,
                            stream_interval=stream_interval)


async def subscribe_and_open(address: str, worker: DecodeWorker, prompts, read_until_done: bool,
                             stream_interval: int = 0):
    """Open every prompt on one subscription: tokens per transfer id, endings, the number of
    messages, and how many tokens of each request each message carried."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodeStreamStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(subscriber_id="router-1"))
        stream = call.__aiter__()
        assert not (await stream.__anext__()).transfer_ids  # registered
        ids = [worker.reserve(f"r{i}", len(p), MAX_TOKENS, time.time() + 60).transfer_id for i, p in enumerate(prompts)]
        for transfer_id, prompt in zip(ids, prompts):
            await stub.Open(stream_request(transfer_id, prompt, "router-1", stream_interval))
        tokens = {i: [] for i in ids}
        sizes = {i: [] for i in ids}
        endings, messages = {}, 0
        while read_until_done and len(endings) < len(ids):
            batch = await stream.__anext__()
            messages += 1
            for tid, token in zip(batch.transfer_ids, batch.token_ids):
                tokens[tid].append(token)
            for tid in set(batch.transfer_ids):
                sizes[tid].append(list(batch.transfer_ids).count(tid))
            endings.update({e.transfer_id: e for e in batch.endings})
        if not read_until_done:
            await stream.__anext__()  # some tokens flowed; then the router goes away
        call.cancel()
        return [tokens[i] for i in ids], endings, messages, [sizes[i] for i in ids]


def test_one_stream_carries_every_request_a_message_per_step(loaded, served):
    worker, server = served
    outputs, endings, messages, _ = asyncio.run(subscribe_and_open(server.address, worker, PROMPTS, True))
    assert outputs == engine_outputs(loaded, [(p, MAX_TOKENS) for p in PROMPTS])
    assert all(e.finish_reason == "length" and not e.error for e in endings.values())
    # 4 requests x 12 tokens: about one message per step (prefill steps add a few), far below 48
    assert messages <= MAX_TOKENS + len(PROMPTS) + 2
    assert worker.pool.num_free == worker.pool.num_blocks


def test_a_stream_interval_sends_the_same_tokens_that_many_at_a_time(loaded, served):
    worker, server = served
    outputs, endings, _, sizes = asyncio.run(subscribe_and_open(server.address, worker, PROMPTS, True,
                                                                 stream_interval=5))
    assert outputs == engine_outputs(loaded, [(p, MAX_TOKENS) for p in PROMPTS])
    # the first token at once, then five at a time, the rest with the ending: 1 + 5 + 5 + 1 = 12
    assert sizes == [[1, 5, 5, 1]] * len(PROMPTS)
    assert all(e.finish_reason == "length" for e in endings.values())
    assert worker.pool.num_free == worker.pool.num_blocks


def test_closing_the_subscription_frees_every_block_at_once(served):
    worker, server = served
    asyncio.run(subscribe_and_open(server.address, worker, [[2] * 40] * 3, False))
    deadline = time.monotonic() + 5
    while worker.pool.num_free != worker.pool.num_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.pool.num_free == worker.pool.num_blocks
    assert worker.load().num_running == 0


def test_open_on_an_unknown_subscription_is_refused(served):
    worker, server = served

    async def open_unknown():
        async with grpc.aio.insecure_channel(server.address) as channel:
            transfer_id = worker.reserve("r", 3, MAX_TOKENS, time.time() + 60).transfer_id
            await pb_grpc.DecodeStreamStub(channel).Open(stream_request(transfer_id, [1, 2, 3], "nobody"))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(open_unknown())
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def reserve_request(i: int, prompt: list[int], subscriber: str | None, max_tokens: int = MAX_TOKENS) -> pb.ReserveRequest:
    call = pb.ReserveRequest(request_id=f"r{i}", num_prompt_tokens=len(prompt), max_tokens=max_tokens,
                             deadline_unix_s=time.time() + 60)
    if subscriber is not None:
        call.open.CopyFrom(stream_request(0, prompt, subscriber))
        call.open.max_tokens = max_tokens
    return call


async def reserve_and_open(address: str, prompts, max_tokens: int = MAX_TOKENS):
    """The router's side: one Subscription; each prompt reserved and opened by one Reserve call,
    its feed claimed from the reply (tokens that come first wait for it)."""
    from pdserve.router.decode_streams import Subscription

    async with grpc.aio.insecure_channel(address) as channel:
        subscription = Subscription(channel)
        await subscription.ready()

        async def one(i: int, prompt: list[int]) -> list[int]:
            with subscription.expecting():
                reply = await subscription.stub.Reserve(reserve_request(i, prompt, subscription.subscriber_id, max_tokens))
                feed = subscription.feed(reply.transfer_id)
            tokens = []
            while True:
                item = await feed.next(30)
                tokens += item.token_ids
                if item.ending is not None:
                    assert item.ending.finish_reason == "length" and not item.ending.error
                    return tokens

        outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        subscription.close()
        return outputs


@pytest.mark.parametrize("max_tokens", [1, MAX_TOKENS])
def test_reserve_with_open_streams_every_token(loaded, served, max_tokens):
    """One call reserves and starts each request; none of its tokens is lost to the reply's race
    (max_tokens 1: the whole request may end before its reply arrives)."""
    worker, server = served
    outputs = asyncio.run(reserve_and_open(server.address, PROMPTS, max_tokens))
    assert outputs == engine_outputs(loaded, [(p, max_tokens) for p in PROMPTS])
    assert worker.pool.num_free == worker.pool.num_blocks


def test_reserve_refusals_say_whether_to_try_elsewhere(loaded):
    """A full waiting queue: RESOURCE_EXHAUSTED (the request is refused); no room in the KV pool or an
    unknown subscription: FAILED_PRECONDITION (another replica may take it), and nothing stays held."""
    settings = decode_settings(load_config({"decode": {"max_waiting": 1}}))
    worker = DecodeWorker(ModelRunner(loaded, 8, 4), None, settings, "decode-refusals")
    server = StreamServer(worker)

    async def codes():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.DecodeStreamStub(channel)
            out = []
            for call in (reserve_request(0, [1] * 4, "nobody"), reserve_request(1, [1] * 40, None),
                         reserve_request(2, [1] * 4, None), reserve_request(3, [1] * 4, None)):
                try:
                    await stub.Reserve(call)
                    out.append("ok")
                except grpc.aio.AioRpcError as e:
                    out.append(e.code())
            return out

    try:
        assert asyncio.run(codes()) == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.FAILED_PRECONDITION,
                                        "ok", grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert worker.pool.num_blocks - worker.pool.num_free == 4  # the one reservation: 4 + 12 tokens
    finally:
        server.stop()
        worker.close()


def test_a_reserve_call_given_up_on_is_freed_by_its_call_id(loaded):
    """A router whose Reserve timed out releases by the call's id: a reservation made late is freed,
    and a call that arrives after its release reserves nothing."""
    worker = DecodeWorker(ModelRunner(loaded, 64, 4), None, decode_settings(load_config()), "decode-late")

    def slow_reserve(*args):
        time.sleep(0.5)  # the replica answers after the router gave up
        return worker.reserve(*args)

    server = StreamServer(worker, reserve=slow_reserve)

    async def give_up_then_release():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.DecodeStreamStub(channel)
            late = reserve_request(0, [1] * 8, None)
            late.call_id = "late-call"
            with pytest.raises(grpc.aio.AioRpcError) as timed_out:
                await stub.Reserve(late, timeout=0.1)
            assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.6)  # the replica reserved all the same
            held = worker.pool.num_blocks - worker.pool.num_free
            await stub.Release(pb.ReleaseRequest(call_id="late-call"))
            early = reserve_request(1, [1] * 8, None)
            early.call_id = "released-first"
            await stub.Release(pb.ReleaseRequest(call_id="released-first"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Reserve(early)
            return held, refused.value.code()

    try:
        held, refused = asyncio.run(give_up_then_release())
        assert held == 5  # 8 + 12 tokens in blocks of 4: the orphan the release frees
        assert refused == grpc.StatusCode.CANCELLED
        deadline = time.monotonic() + 5
        while worker.pool.num_free != worker.pool.num_blocks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.pool.num_free == worker.pool.num_blocks
    finally:
        server.stop()
        worker.close()
