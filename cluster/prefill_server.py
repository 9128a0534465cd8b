"""The prefill replica's gRPC server (its Serve shell's part): the routers call `Prefill` here, not through Ray.

A call waits for its prompt's batch, the KV push into the decode replica's blocks,
and the first token. Its request is unpickled only once its seal checks out. A full queue (or a draining replica) answers RESOURCE_EXHAUSTED
at once, so the router tries another replica; a failed prefill or push comes back
in the reply with its failure code.
"""
from __future__ import annotations

import asyncio
import pickle

import grpc

from pdserve.decode_worker.rpc_server import RpcServer
from pdserve.engine.sealed import SealBroken, unseal
from pdserve.protos.pdserve.v1 import prefill_pb2 as pb
from pdserve.protos.pdserve.v1 import prefill_pb2_grpc as pb_grpc

from pdserve.prefill_worker.worker import PrefillFailed, PrefillOverloaded, PrefillWorker


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, call_secret: str):
        self.worker, self.call_secret = worker, call_secret

    async def Prefill(self, call: pb.PrefillCall, context: grpc.aio.ServicerContext) -> pb.PrefillReply:
        try:
            request = unseal(call.request, call.signature, self.call_secret)
        except SealBroken as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        try:
            result = await asyncio.wrap_future(self.worker.submit(request))
        except PrefillOverloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except PrefillFailed as e:
            return pb.PrefillReply(error=f"prefill replica {self.worker.replica_id}: {e}", error_code=e.code.value)
        return pb.PrefillReply(result=pickle.dumps(result))


class PrefillServer:
    def __init__(self, worker: PrefillWorker, call_secret: str, host: str = "127.0.0.1", port: int = 0):
        service = PrefillService(worker, call_secret)
        self._server = RpcServer(lambda server: pb_grpc.add_PrefillServicer_to_server(service, server),
                                 host, port, "prefill-rpc")
        self.address = self._server.address

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s)
