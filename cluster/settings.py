"""What each part is built with, read from the one config tree.

The parts' settings dataclasses declare no defaults for what the config sets
(cluster/config.py writes each default once), so a worker started here runs with
exactly what `pdserve serve` serves, and a test that builds a worker through these
functions sees the same. Where the config and a part name a value differently,
the mapping is here and only here.
"""
from __future__ import annotations

from pdserve.decode_worker.worker import DecodeSettings
from pdserve.prefill_worker.worker import PrefillSettings
from pdserve.router.ingress import IngressSettings
from pdserve.router.limits import RequestLimits
from pdserve.router.pipeline import PipelineSettings

from .config import PdserveConfig


def prefill_settings(config: PdserveConfig) -> PrefillSettings:
    return PrefillSettings(max_batch_tokens=config.prefill.max_batch_tokens,
                           max_queued_requests=config.prefill.max_queued_requests,
                           transfer_timeout_s=config.transfer.timeout_s,
                           prefix_caching=config.prefill.prefix_caching)


def decode_settings(config: PdserveConfig) -> DecodeSettings:
    """A decode replica prefills locally (colocated, short prompts, failover) under the prefill pool's budget."""
    decode = config.decode
    return DecodeSettings(max_running=decode.max_running, max_waiting=decode.max_waiting,
                          prefill_chunk_tokens=config.prefill.max_batch_tokens,
                          transfer_timeout_s=config.transfer.timeout_s, overlap_steps=decode.overlap_steps,
                          # the arrival rate it reports spans a few autoscaling intervals
                          arrival_window_s=max(4 * config.autoscaling.interval_s, 2.0))


def pipeline_settings(config: PdserveConfig) -> PipelineSettings:
    return PipelineSettings(colocated=config.is_colocated, short_prompt_tokens=config.router.short_prompt_tokens,
                            call_secret=config.router.call_secret, stream_interval=config.router.stream_interval)


def ingress_settings(config: PdserveConfig, app_id: str) -> IngressSettings:
    """`app_id`: the application the routers' ports belong to (router/ingress.py)."""
    router = config.router
    return IngressSettings(router.http_host, router.http_port, router.grpc_port, config.limits.request_timeout_s, app_id)


def request_limits(config: PdserveConfig, max_model_len: int) -> RequestLimits:
    """`limits`, with the model's context length (the served model's, after `model.max_model_len`)."""
    lim = config.limits
    return RequestLimits(max_model_len=max_model_len, max_body_bytes=lim.max_body_bytes,
                         max_prompt_tokens=lim.max_prompt_tokens, max_tokens=lim.max_tokens, max_n=lim.max_n,
                         max_stop=lim.max_stop, request_timeout_s=lim.request_timeout_s)
