"""Assembling the Ray Serve application from the config.

`build_app(args)` is a Ray Serve application builder: the Helm chart's
`serveConfigV2` names it as `pdserve.cluster.app:build_app` with the config
mapping as `args`, and `pdserve serve` calls it directly. Importing this module
starts nothing and loads no model.
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from ray import serve
from ray.serve import Application

from .autoscaling import serve_autoscaling_config
from .config import PdserveConfig, ReplicaRange, load_config
from .deployments import DecodeDeployment, PrefillDeployment, RouterDeployment
from .tp_ranks import placement

def build_app(args: dict[str, Any] | PdserveConfig) -> Application:
    """The pdserve application: router → prefill pool → decode pool (or one colocated pool)."""
    config = with_call_secret(args if isinstance(args, PdserveConfig) else load_config(args))
    plain = config.to_dict()
    if config.is_colocated:
        colocated = _deployment(DecodeDeployment, "colocated", ReplicaRange(config.colocated.replicas, config.colocated.replicas),
                                config.colocated.gpus_per_replica, config.decode.ray_resources, config)
        decode, prefill = colocated.bind(plain, colocated=True), None
    else:
        prefill = _deployment(PrefillDeployment, "prefill", config.prefill.replicas,
                              config.prefill.gpus_per_replica, config.prefill.ray_resources, config).bind(plain)
        decode = _deployment(DecodeDeployment, "decode", config.decode.replicas,
                             config.decode.gpus_per_replica, config.decode.ray_resources, config).bind(plain)
    router = serve.deployment(RouterDeployment).options(
        name="router", num_replicas=config.router.replicas, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "resources": dict(config.router.ray_resources)},
    )
    return router.bind(plain, prefill, decode)


def with_call_secret(config: PdserveConfig) -> PdserveConfig:
    """The config with a fresh call secret unless it has one: drawn once per application, every
    replica gets it with the config (engine/sealed.py)."""
    if config.router.call_secret:
        return config
    return dataclasses.replace(config, router=dataclasses.replace(config.router, call_secret=secrets.token_hex(16)))


def _deployment(cls: type, name: str, replicas: ReplicaRange, gpus: float, resources: dict[str, float],
                config: PdserveConfig):
    """A pool: fixed, or sized by the application's policy (cluster/autoscaling.py) when any pool autoscales.
    Routers call its replicas' own gRPC servers (router/directory.py), never through its Serve handle."""
    autoscaling = serve_autoscaling_config(config, name)
    sizing = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas.min}
    return serve.deployment(cls).options(
        name=name,
        **sizing,
        **placement(config, name, gpus, resources),  # TP N: N bundles on one node, the ranks in 1..N-1
        max_ongoing_requests=10_000,  # the workers bound their own queues and answer 429
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus, "resources": dict(resources)},
        # a replica leaving drains in __del__ (its streams, bounded by drain_timeout_s) before Serve kills it
        graceful_shutdown_timeout_s=config.autoscaling.drain_timeout_s + 30,
        graceful_shutdown_wait_loop_s=0.5,
    )
