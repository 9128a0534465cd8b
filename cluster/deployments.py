"""The Ray Serve deployments: thin shells around the workers and the router.

Each shell builds its part from the validated config, turns the part's own
exceptions into the router's typed errors (so they cross the Ray call as
themselves), and nothing more.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

from fastapi.responses import PlainTextResponse
import ray
from ray import serve

from pdserve.decode_worker.errors import ReplicaBroken
from pdserve.decode_worker.stream_server import StreamServer
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.kv_cache import kv_dtype, num_blocks_that_fit
from pdserve.engine.loader import DEFAULT_MODEL_NAME, read_model_spec
from pdserve.engine.messages import Reservation
from pdserve.engine.parallel import TensorParallel
from pdserve.engine.roofline import Roofline, decode_step_anchors
from pdserve.engine.runner import ModelRunner
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.engine.tp_runner import TpRunner
from pdserve.engine.transfer import KvShard, make_receiver, make_sender
from pdserve.engine.transfer.group import ReceiverGroup
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.auth import ApiKey, ApiKeyMiddleware
from pdserve.router.grpc_api import GrpcFrontEnd
from pdserve.router.ingress import APP_PATH, Ingress
from pdserve.router.metrics import autoscaling_lines
from pdserve.router.openai_api import make_http_app
from pdserve.router.directory import DecodeDirectory, PrefillDirectory
from pdserve.router.pipeline import Pipeline
from pdserve.router.served_models import ServedModels

from .autoscaling import NOTES_KEY as AUTOSCALING_NOTE
from .config import PdserveConfig, load_config, replica_gpus
from .prefill_server import PrefillServer
from .rank_process import (
    build_runner, kv_host, load_rank_model, model_dir, rank_device, tokenizer_dir, transfer_backend,
)
from .registry import Reporter, registry
from .settings import decode_settings, ingress_settings, pipeline_settings, prefill_settings, request_limits
from .tp_ranks import TpGroup

log = logging.getLogger(__name__)


def served_models(config: PdserveConfig) -> ServedModels:
    """`model.served_model_name`, else `model.path` exactly as given (the embedded default model: its name)."""
    return ServedModels(config.model.served_model_name or (config.model.path or DEFAULT_MODEL_NAME,))


def _replica_id(pool: str) -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests of the shells)
        return f"{pool}-local"


def _node_host() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _runner(config: PdserveConfig, tp: TensorParallel) -> ModelRunner:
    """The leader's runner; its pool size is every rank's (TpGroup.start_followers)."""
    loaded = load_rank_model(config, tp)
    kv = config.kv_cache
    per_block = 2 * kv.block_size * loaded.layout.num_kv_heads * loaded.spec.head_dim * loaded.spec.num_layers
    per_block *= kv_dtype(kv.dtype, loaded.dtype).itemsize
    blocks = kv.num_blocks or num_blocks_that_fit(per_block, loaded.device, kv.memory_fraction, kv.cpu_num_blocks)
    return build_runner(config, loaded, blocks, tp)


def _shard(runner: ModelRunner) -> KvShard:
    return KvShard(runner.tp.rank, runner.tp.size, runner.spec.num_kv_heads)


def _check_ranks(ranks: TpGroup, runner: TpRunner) -> None:
    if runner.broken is not None:
        raise RuntimeError(f"the replica's TP group broke: {runner.broken}")
    ranks.check_health()


def weight_bytes_per_gpu(runner: ModelRunner) -> int:
    """Weight bytes one decode step reads on each of the replica's GPUs: its rank's share, at the model's
    dtype (FP8 weights: counted at 2 B)."""
    return runner.spec.num_params * runner.model.dtype.itemsize // runner.tp.size


def decode_stats(worker: DecodeWorker, roofline: Roofline | None, weight_bytes: int) -> dict[str, Any]:
    """A decode replica's load, KV use and, on a GPU with sequences running, its MBU over the GPU's busy
    time per step and over the step's wall time (labelled). `worker.runner` is a TpRunner: only what
    it exposes (spec, kv_cache, device) may be read here."""
    load = worker.load()
    stats = {**dataclasses.asdict(load), "num_blocks_used": load.num_blocks_total - load.num_blocks_free,
             "kv_block_size": worker.pool.block_size}
    if roofline is not None and load.num_running:
        kv_read = load.num_context_tokens * worker.runner.kv_cache.spec.bytes_per_token
        stats["mbu_busy"] = roofline.decode_mbu(weight_bytes, kv_read, load.gpu_step_time_s)
        stats["mbu_wall"] = roofline.decode_mbu(weight_bytes, kv_read, load.step_time_s)
    return stats


def _numbers(stats: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a replica's stats, as Ray Serve's custom autoscaling metrics take them."""
    return {key: float(value) for key, value in stats.items() if isinstance(value, (int, float))}


def _close_parts(replica: Any, *parts: str) -> None:
    """Drain the replica's worker, stop `parts`, close the worker: only the parts it has. A replica
    whose __init__ failed part-way (a model it cannot run) then leaves no second traceback from here."""
    built = vars(replica)
    worker = built.get("worker")
    if worker is not None:
        worker.drain(replica.config.autoscaling.drain_timeout_s)
    for part in parts:
        if part in built:
            built[part].stop()
    if worker is not None:
        worker.close()
    if "ranks" in built:  # the replica's other TP ranks, after its worker stopped driving them
        built["ranks"].stop()


class PrefillDeployment:
    def __init__(self, config: dict[str, Any]):
        self.config = load_config(config)
        self.replica_id = _replica_id("prefill")
        self.ranks = TpGroup.start(self.config, "prefill", self.replica_id, _node_host(), rank_device())
        runner = _runner(self.config, self.ranks.tp)
        sender = make_sender(transfer_backend(self.config, runner), runner.kv_cache, sender_id=self.replica_id,
                             timeout_s=self.config.transfer.timeout_s, host=kv_host(self.config),
                             shard=_shard(runner))
        self.ranks.start_followers(runner.kv_cache.spec.num_blocks)
        tp_runner = TpRunner(runner, sender)
        self.roofline = Roofline.measure(runner.device)
        if self.roofline is not None:  # a GPU: no batch of the first requests stalls on a graph capture
            tp_runner.capture_graphs(decode=False)
        self.worker = PrefillWorker(tp_runner, sender, prefill_settings(self.config), self.replica_id)
        self.server = PrefillServer(self.worker, self.config.router.call_secret, host=_node_host())
        self.reporter = Reporter("prefill", self.replica_id, self.stats)

    def stats(self) -> dict[str, Any]:
        """Also where routers find this replica: they call `address` (router/directory.py)."""
        batches = self.worker.batch_times()
        stats = {**dataclasses.asdict(self.worker.load()), "pid": os.getpid(), "address": self.server.address,
                 "rank_pids": self.ranks.pids,
                 "tensor_parallel_size": self.ranks.tp.size, "num_gpus": replica_gpus(self.config, "prefill")}
        if self.roofline is not None and batches.num_steps:
            spec = self.worker.runner.spec  # MFU over the GPU's busy time and over the wall time, labelled
            gpus = self.ranks.tp.size  # the replica's rate over all its GPUs' matmul rate
            stats["mfu_busy"] = self.roofline.prefill_mfu(spec, batches.size / max(batches.step_busy_s, 1e-9)) / gpus
            stats["mfu_wall"] = self.roofline.prefill_mfu(spec, batches.size / max(batches.wall_s, 1e-9)) / gpus
        return stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics: the prefill backlog and rate."""
        return _numbers(self.stats())

    def check_health(self) -> None:
        """Serve's health check: a broken TP group fails it, and Serve replaces the replica."""
        _check_ranks(self.ranks, self.worker.runner)

    def __del__(self) -> None:
        _close_parts(self, "reporter", "server")


class DecodeDeployment:
    def __init__(self, config: dict[str, Any], colocated: bool = False):
        self.config = load_config(config)
        self.pool = pool = "colocated" if colocated else "decode"
        self.replica_id = _replica_id(pool)
        host = _node_host()
        self.ranks = TpGroup.start(self.config, pool, self.replica_id, host, rank_device())
        runner = _runner(self.config, self.ranks.tp)
        receiver = None if colocated else make_receiver(
            transfer_backend(self.config, runner), runner.kv_cache, host=kv_host(self.config) or host,
            peer_id=self.replica_id, timeout_s=self.config.transfer.timeout_s, shard=_shard(runner))
        self.ranks.start_followers(runner.kv_cache.spec.num_blocks)
        if receiver is not None and self.ranks.actors:  # every rank's receiver, as one
            receiver = ReceiverGroup([receiver, *self.ranks.receivers()])
        self.tp_runner = TpRunner(runner)
        self.roofline = Roofline.measure(runner.device)
        self.weight_bytes = weight_bytes_per_gpu(runner)
        # The engine's own step at batch 1 and at the batch limit, before any request: diagnose's anchors.
        # GPU only, as the roofline: on the CPU, replicas starting beside each other make it noise.
        if self.roofline is not None:  # a GPU: no step of the first requests stalls on a graph capture
            self.tp_runner.capture_graphs()
        self.engine_steps = decode_step_anchors(self.tp_runner, (1, self.config.decode.max_running)) if self.roofline is not None else []
        self.worker = DecodeWorker(self.tp_runner, receiver, decode_settings(self.config), self.replica_id)
        self.server = StreamServer(self.worker, host=host, reserve=self._reserve)
        self.worker.stream_address = self.server.address
        self.reporter = Reporter("decode", self.replica_id, self.stats)

    def stats(self) -> dict[str, Any]:
        """Also where routers find this replica: they reserve on `address` (router/directory.py)."""
        return {**decode_stats(self.worker, self.roofline, self.weight_bytes), "pid": os.getpid(),
                "address": self.server.address,
                "engine_steps": self.engine_steps, "rank_pids": self.ranks.pids,
                "tensor_parallel_size": self.ranks.tp.size, "num_gpus": replica_gpus(self.config, self.pool)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics: arrivals, batch, KV use, step time against batch size."""
        return _numbers(self.stats())

    def _reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int, deadline: float) -> Reservation:
        """The stream server's `Reserve`: the worker's, refused while the TP group is broken."""
        if self.tp_runner.broken is not None:  # until Serve replaces this replica, requests go elsewhere
            raise ReplicaBroken(f"decode replica {self.replica_id}: its TP group broke: {self.tp_runner.broken}")
        return self.worker.reserve(request_id, num_prompt_tokens, max_tokens, deadline)

    def check_health(self) -> None:
        """Serve's health check: a broken TP group fails it, and Serve replaces the replica."""
        _check_ranks(self.ranks, self.tp_runner)

    def __del__(self) -> None:
        _close_parts(self, "reporter", "server")


class RouterDeployment:
    """The ingress: HTTP (OpenAI API) and gRPC `pdserve.v1.Generation` on the router's own listeners
    (router/ingress.py), shared by every router replica of a node; Ray Serve's proxies stay off."""

    def __init__(self, config: dict[str, Any], prefill: Any, decode: Any):
        """`prefill`, `decode`: the pools' Serve handles, bound so that Serve deploys the pools with
        the router; requests reach their replicas' own servers (router/directory.py)."""
        self.config = load_config(config)
        directory = model_dir(self.config)
        spec = read_model_spec(directory, self.config.model.max_model_len)
        self.tokenizer = load_tokenizer(tokenizer_dir(self.config))
        if self.config.model.chat_template is not None:  # --chat-template: the deployment's, not the checkpoint's
            self.tokenizer.chat_template = self.config.model.chat_template
        self._registry = registry()
        snapshot = lambda: self._registry.snapshot.remote()  # noqa: E731 - awaited on the ingress loop
        router = self.config.router
        self.pipeline = Pipeline(None if self.config.is_colocated else PrefillDirectory(snapshot, router.prefill_policy),
                                 DecodeDirectory(snapshot, router.decode_policy), self.tokenizer, spec.eos_token_ids,
                                 pipeline_settings(self.config))
        self.limits = request_limits(self.config, spec.max_model_len)
        self.api_key = ApiKey(self.config.router.api_key) if self.config.router.api_key else None
        self.app_id = _application_id()
        self.ingress = Ingress(ingress_settings(self.config, self.app_id))
        grpc_front = GrpcFrontEnd(self.pipeline, self.tokenizer, served_models(self.config), self.limits, self.api_key)
        self.ingress.start(self._http_app(), grpc_front)

    def _http_app(self):
        app = make_http_app(self.pipeline, self.tokenizer, served_models(self.config), self.limits)
        app.add_api_route("/metrics", self.metrics, methods=["GET"], response_class=PlainTextResponse)
        app.add_api_route("/v1/pdserve/status", self.status, methods=["GET"])
        app.add_api_route(APP_PATH, lambda: {"app": self.app_id}, methods=["GET"])  # which application holds the port
        # KubeRay's probe of a Serve node (GET /-/healthz on the HTTP port, expects "success")
        app.add_api_route("/-/healthz", lambda: PlainTextResponse("success"), methods=["GET"])
        if self.api_key is not None:
            app.add_middleware(ApiKeyMiddleware, api_key=self.api_key)
        return app

    async def metrics(self) -> PlainTextResponse:
        pools, notes = await self._registry.snapshot.remote(), await self._registry.notes.remote()
        text = self.pipeline.metrics.render(pools, autoscaling_lines(notes.get(AUTOSCALING_NOTE)))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def status(self) -> dict[str, Any]:
        """Pools, replicas, KV use and queues, as `pdserve status` shows them."""
        return {"model": served_models(self.config).primary, "colocated": self.config.is_colocated,
                "pools": await self._registry.snapshot.remote(), "autoscaling": await self._registry.notes.remote()}

    def __del__(self) -> None:
        ingress = getattr(self, "ingress", None)  # None when the constructor failed before it
        if ingress is not None:
            ingress.stop()


def _application_id() -> str:
    """This Serve application on this Ray cluster: its routers (an in-place upgrade's too) share their
    ports, a second `pdserve serve` on the host does not."""
    cluster = ray.get_runtime_context().gcs_address
    return hashlib.sha256(f"{cluster}/{serve.get_replica_context().app_name}".encode()).hexdigest()[:16]
