"""The prefill replica's gRPC server: a sealed call prefills into a decode replica's blocks and
answers the first token; a call not sealed with the application's secret is refused unread."""
import asyncio
import pickle
import time

import grpc
import pytest

from pdserve.engine.messages import PrefillRequest, SamplingParams
from pdserve.engine.sealed import seal
from pdserve.cluster.prefill_server import PrefillServer
from pdserve.protos.pdserve.v1 import prefill_pb2 as pb
from pdserve.protos.pdserve.v1 import prefill_pb2_grpc as pb_grpc
from handoff_helpers import engine_outputs

SECRET = "the-application's-secret"
PROMPT = [5, 9, 13, 2, 7]


@pytest.fixture
def server(workers):
    prefill, decode = workers
    server = PrefillServer(prefill, SECRET)
    yield server, decode
    server.stop()


def call(server: PrefillServer, request: PrefillRequest, secret: str) -> pb.PrefillReply:
    async def go():
        async with grpc.aio.insecure_channel(server.address) as channel:
            payload, signature = seal(request, secret)
            return await pb_grpc.PrefillStub(channel).Prefill(pb.PrefillCall(request=payload, signature=signature))
    return asyncio.run(go())


def test_a_sealed_call_answers_the_first_token(loaded, server):
    server, decode = server
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(PROMPT), 4, deadline)
    reply = call(server, PrefillRequest("r", tuple(PROMPT), SamplingParams(), reservation.destination, deadline), SECRET)
    assert not reply.error
    assert pickle.loads(reply.result).first_token == engine_outputs(loaded, [(PROMPT, 1)])[0][0]
    decode.abort(reservation.transfer_id)


def test_an_unsealed_call_is_refused_unread(server):
    server, decode = server
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(PROMPT), 4, deadline)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        call(server, PrefillRequest("r", tuple(PROMPT), SamplingParams(), reservation.destination, deadline), "guess")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    decode.abort(reservation.transfer_id)
