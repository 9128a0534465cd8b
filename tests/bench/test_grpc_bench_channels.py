"""`pdserve bench --grpc` spreads its requests over several connections, as HTTP's connection pool
does: router replicas share a port and the kernel balances connections, not calls."""
import asyncio

import grpc

from pdserve.cluster.bench.client import GrpcClient, RequestRecord
from pdserve.cluster.bench.workload import RequestSpec
from pdserve.protos.pdserve.v1 import generate_pb2 as pb
from pdserve.protos.pdserve.v1 import generate_pb2_grpc as pb_grpc


class Peers(pb_grpc.GenerationServicer):
    """Answers one token and notes the connection (client address and port) each call came on."""

    def __init__(self):
        self.peers = []

    async def Generate(self, request, context):
        self.peers.append(context.peer())
        yield pb.GenerateResponse(token_ids=[7], finish_reason="length")


def test_requests_take_the_channels_in_turn():
    async def run():
        server, servicer = grpc.aio.server(), Peers()
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = GrpcClient(f"127.0.0.1:{port}", num_channels=4)
        records = [RequestRecord(sent_at=0.0, max_tokens=1) for _ in range(8)]
        for record in records:
            await client.send(RequestSpec([1, 2, 3], 1), record)
        await client.close()
        await server.stop(0)
        return servicer.peers, records

    peers, records = asyncio.run(run())
    assert all(r.output_tokens == 1 and r.error is None for r in records)
    assert len(set(peers)) == 4 and peers[:4] == peers[4:]  # four connections, each used in turn
