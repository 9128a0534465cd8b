"""`pdserve serve`: start (or join) Ray, deploy the application, serve until Ctrl-C."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch

from pdserve.engine.loader import DEFAULT_MODEL_NAME, default_model_dir, read_model_spec, resolve_model_path
from pdserve.router.ingress import check_ports_are_ours

from .app import build_app
from .autoscaling import is_autoscaled, serve_application_policy
from .config import PdserveConfig, load_config
from .settings import ingress_settings

log = logging.getLogger(__name__)

APP_NAME = "pdserve"


def prepare(config: PdserveConfig, joining: bool) -> PdserveConfig:
    """Resolve what the replicas must agree on before they start: the model path, GPUs or none."""
    data = config.to_dict()
    if config.model.path is None:
        data["model"]["path"] = str(default_model_dir(config.model.cache_dir))  # dequantised once, here, not in every replica
        data["model"]["served_model_name"] = list(config.model.served_model_name) or [DEFAULT_MODEL_NAME]
    if not joining or Path(data["model"]["path"]).is_dir():
        # A model the engine cannot run is refused here, before anything is deployed
        # (UnsupportedModel / ModelLoadError), not by every replica inside Ray. A model id is fetched
        # into the cache here, once; the replicas find it there (joining: each node's own cache).
        directory = resolve_model_path(data["model"]["path"], config.model.revision, config.model.download_dir)
        read_model_spec(directory, config.model.max_model_len)
        if config.model.tokenizer is not None:
            resolve_model_path(config.model.tokenizer, None, config.model.download_dir)
    if not joining:
        # The routers will listen here: a port another process holds is refused now (PortTaken),
        # not by a router replica inside Ray. No application of ours is running yet, so none is "ours".
        check_ports_are_ours(ingress_settings(config, app_id=""))
    if not joining and not torch.cuda.is_available():
        for pool in ("prefill", "decode", "colocated"):
            data[pool]["gpus_per_replica"] = 0.0
    return load_config(data)


def start(config: PdserveConfig, address: str | None) -> None:
    """Start Ray (or connect) and deploy; returns once the application is running."""
    import ray
    from ray import serve

    with _sigint_deferred():  # ray.init interrupted halfway leaves a driver that cannot shut down
        if address:
            # Joining: each replica's listeners bind the address Ray reports for its own node.
            ray.init(address=address)
        else:
            # One machine: Ray's node address is loopback, so the KV channels and token streams are too.
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    # The router replicas listen on router.http_port / grpc_port themselves (router/ingress.py).
    serve.start(proxy_location="Disabled")
    if is_autoscaled(config):
        _deploy_with_policy(config)
    else:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """A SIGINT during the block raises KeyboardInterrupt once the block is done."""
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _deploy_with_policy(config: PdserveConfig, timeout_s: float = 900.0) -> None:
    """Deploy as a Serve config: Ray Serve takes an application-level autoscaling policy only from one."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP_NAME, "route_prefix": "/", "import_path": "pdserve.cluster.app:build_app",
           "args": config.to_dict(), "autoscaling_policy": serve_application_policy(config)}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"pdserve application failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"pdserve application not running after {timeout_s:.0f} s")


def stop() -> None:
    """Take down Serve and the Ray this process started (or leave the cluster it joined)."""
    import ray

    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_forever(config: PdserveConfig, address: str | None) -> None:
    config = prepare(config, joining=address is not None)
    if config.router.http_host not in ("127.0.0.1", "localhost", "::1") and not config.router.api_key:
        log.warning("listening on %s without an API key: anyone who reaches it can use it", config.router.http_host)
    try:  # SIGINT reaches this process even if it started in the background (cli._serve)
        start(config, address)
    except (KeyboardInterrupt, SystemExit):  # interrupted while deploying (ray.init makes SIGTERM exit):
        # take down what was deployed, not leave it running
        print("pdserve: interrupted while deploying; shutting down", flush=True)
        stop()
        return
    router = config.router
    print(f"pdserve: serving {config.model.path} — HTTP http://{router.http_host}:{router.http_port}/v1 , "
          f"gRPC {router.http_host}:{router.grpc_port} (Ctrl-C to stop)", flush=True)
    done = threading.Event()
    # Both set explicitly: a process started with SIGINT ignored (in the background) still stops on it.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: done.set())
    while not done.wait(1.0):  # woken each second: the handlers run on this thread
        pass
    print("pdserve: shutting down", flush=True)
    stop()
