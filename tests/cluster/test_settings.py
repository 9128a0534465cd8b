"""What each part runs with is what `pdserve serve` serves: one definition of each default."""
from __future__ import annotations

import dataclasses

import pytest

from pdserve.cluster.autoscaling import PolicySettings
from pdserve.cluster.cli import make_parser, serve_config
from pdserve.cluster.app import with_call_secret
from pdserve.cluster.config import load_config
from pdserve.cluster.settings import (
    decode_settings, ingress_settings, pipeline_settings, prefill_settings, request_limits,
)
from pdserve.decode_worker.worker import DecodeSettings
from pdserve.prefill_worker.worker import PrefillSettings
from pdserve.router.limits import RequestLimits
from pdserve.router.pipeline import PipelineSettings

# The parts' own constants, named by no config key
NOT_CONFIG_KEYS = {"reserve_retry_s", "up_headroom", "down_headroom"}


def _served(*flags: str):
    return serve_config(make_parser().parse_args(["serve", *flags]))


@pytest.mark.parametrize("cls", [PrefillSettings, DecodeSettings, PipelineSettings, RequestLimits, PolicySettings])
def test_the_parts_declare_no_default_of_their_own_for_what_the_config_sets(cls):
    with_default = {f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert with_default <= NOT_CONFIG_KEYS


def test_workers_started_by_default_see_what_pdserve_serve_serves():
    config = _served()
    assert prefill_settings(config) == PrefillSettings(max_batch_tokens=2048, max_queued_requests=256,
                                                       transfer_timeout_s=30.0, prefix_caching=True)
    # the decode replica's local prefill budget is the prefill pool's (it once defaulted to 512 here)
    assert decode_settings(config) == DecodeSettings(max_running=64, max_waiting=256, prefill_chunk_tokens=2048,
                                                     transfer_timeout_s=30.0, overlap_steps=None,
                                                     arrival_window_s=20.0)
    assert pipeline_settings(config) == PipelineSettings(colocated=False, short_prompt_tokens=0, call_secret="",
                                                         stream_interval=1)
    assert ingress_settings(config, "app").http_port == 8000 and ingress_settings(config, "app").grpc_port == 9000
    limits = request_limits(config, max_model_len=4096)
    assert (limits.max_body_bytes, limits.max_n, limits.max_stop, limits.request_timeout_s) == (4 << 20, 16, 16, 600.0)
    assert PolicySettings.from_config(config).max_running == 64


def test_every_part_setting_follows_its_config_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("prefill: {max_batch_tokens: 512, max_queued_requests: 7, prefix_caching: false}\n"
                    "decode: {max_running: 5, max_waiting: 9, overlap_steps: true}\n"
                    "transfer: {timeout_s: 4}\nrouter: {short_prompt_tokens: 32, stream_interval: 4}\n"
                    "limits: {max_n: 2, max_stop: 1, max_tokens: 100, max_prompt_tokens: 50, request_timeout_s: 9}\n")
    config = _served("--config", str(path), "--colocated", "2", "--http-port", "8100")
    assert prefill_settings(config) == PrefillSettings(512, 7, 4.0, False)
    assert decode_settings(config) == DecodeSettings(5, 9, 512, 4.0, True, 20.0)
    assert pipeline_settings(config) == PipelineSettings(colocated=True, short_prompt_tokens=32, call_secret="",
                                                         stream_interval=4)
    assert ingress_settings(config, "app").http_port == 8100
    limits = request_limits(config, max_model_len=4096)
    assert (limits.max_n, limits.max_stop, limits.max_tokens, limits.max_prompt_tokens, limits.request_timeout_s) \
        == (2, 1, 100, 50, 9.0)
    assert PolicySettings.from_config(config).max_running == 5


def test_each_application_draws_its_own_call_secret_unless_given():
    drawn = [with_call_secret(load_config()).router.call_secret for _ in range(2)]
    assert len(drawn[0]) == 32 and drawn[0] != drawn[1]
    assert with_call_secret(load_config({"router": {"call_secret": "s3"}})).router.call_secret == "s3"
