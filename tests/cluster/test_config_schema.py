"""The config schema as a spec: its defaults, what it refuses (naming the key), and how YAML and flags land."""
from __future__ import annotations

import dataclasses

import pytest

from pdserve.cluster.cli import main, make_parser, serve_config
from pdserve.cluster.config import ConfigError, PdserveConfig, ReplicaRange, load_config, load_config_file


def test_the_defaults():
    config = load_config()
    assert config == PdserveConfig()
    assert config.prefill.replicas == config.decode.replicas == ReplicaRange(1, 1)
    assert (config.prefill.max_batch_tokens, config.prefill.max_queued_requests) == (2048, 256)
    assert (config.decode.max_running, config.decode.max_waiting, config.decode.overlap_steps) == (64, 256, None)
    assert not config.is_colocated and config.colocated.replicas == 0
    assert (config.kv_cache.block_size, config.kv_cache.num_blocks, config.kv_cache.memory_fraction) == (16, None, 0.8)
    assert (config.transfer.backend, config.transfer.timeout_s, config.transfer.interface) == ("auto", 30.0, None)
    assert (config.router.http_host, config.router.http_port, config.router.grpc_port) == ("127.0.0.1", 8000, 9000)
    assert (config.router.prefill_policy, config.router.decode_policy) == ("prefix_aware", "least_loaded")
    assert (config.slo.ttft_ms, config.slo.tpot_ms) == (1000.0, 100.0)
    assert (config.autoscaling.upscale_delay_s, config.autoscaling.downscale_delay_s) == (30.0, 600.0)
    assert (config.limits.max_body_bytes, config.limits.max_n, config.limits.request_timeout_s) == (4 << 20, 16, 600.0)
    assert (config.model.path, config.model.dtype, config.model.cache_dir) == (None, "auto", None)
    assert (config.engine.gemv_max_rows, config.engine.gil_switch_interval_s) == (None, 0.001)


def test_to_dict_round_trips_a_whole_tree():
    config = load_config({"prefill": {"replicas": "1:4"}, "decode": {"ray_resources": {"dnode": 1}},
                          "model": {"served_model_name": ["a", "b"], "cache_dir": "/cache"},
                          "engine": {"gemv_max_rows": 0}})
    assert load_config(config.to_dict()) == config


@pytest.mark.parametrize("value, expected", [(3, ReplicaRange(3, 3)), ("3", ReplicaRange(3, 3)),
                                             ("1:4", ReplicaRange(1, 4))])
def test_replica_counts(value, expected):
    assert load_config({"decode": {"replicas": value}}).decode.replicas == expected


@pytest.mark.parametrize("data, key", [
    ({"nope": 1}, "config: unknown key(s) ['nope']"),
    ({"prefill": {"max_batch_token": 16}}, "prefill: unknown key(s) ['max_batch_token']"),
    ({"engine": {"gemv_rows": 8}}, "engine: unknown key(s)"),
])
def test_unknown_keys_are_refused_listing_the_known_ones(data, key):
    with pytest.raises(ConfigError, match="known:") as error:
        load_config(data)
    assert key in str(error.value)


@pytest.mark.parametrize("data, message", [
    # types
    ({"prefill": {"max_batch_tokens": "big"}}, "prefill.max_batch_tokens: expected int"),
    ({"prefill": {"max_batch_tokens": True}}, "prefill.max_batch_tokens: expected int"),
    ({"decode": {"overlap_steps": "yes"}}, "decode.overlap_steps: expected bool"),
    ({"slo": {"ttft_ms": None}}, "slo.ttft_ms: must be set"),
    ({"router": "x"}, "router: expected a mapping"),
    ({"model": {"cache_dir": 3}}, "model.cache_dir: expected str"),
    # choices
    ({"model": {"dtype": "int4"}}, "model.dtype: 'int4' is not one of"),
    ({"kv_cache": {"dtype": "fp4"}}, "kv_cache.dtype: 'fp4' is not one of"),
    ({"transfer": {"backend": "rdma"}}, "transfer.backend: 'rdma' is not one of"),
    ({"router": {"prefill_policy": "random"}}, "router.prefill_policy: 'random' is not one of"),
    ({"router": {"decode_policy": "prefix_aware"}}, "router.decode_policy: 'prefix_aware' is not one of"),
    # ranges
    ({"prefill": {"max_queued_requests": 0}}, "prefill.max_queued_requests: must be > 0"),
    ({"decode": {"max_running": -1}}, "decode.max_running: must be > 0"),
    ({"decode": {"tensor_parallel_size": 0}}, "decode.tensor_parallel_size: must be > 0"),
    ({"kv_cache": {"num_blocks": 0}}, "kv_cache.num_blocks: must be > 0"),
    ({"limits": {"max_tokens": 0}}, "limits.max_tokens: must be > 0"),
    ({"engine": {"gil_switch_interval_s": 0}}, "engine.gil_switch_interval_s: must be > 0"),
    ({"engine": {"gemv_max_rows": -1}}, "engine.gemv_max_rows: must be >= 0"),
    ({"router": {"short_prompt_tokens": -1}}, "router.short_prompt_tokens: must be >= 0"),
    ({"prefill": {"gpus_per_replica": -0.5}}, "prefill.gpus_per_replica: must be >= 0"),
    ({"router": {"http_port": 70000}}, "router.http_port: a port must be in 1..65535"),
    ({"kv_cache": {"memory_fraction": 1.5}}, "kv_cache.memory_fraction: must be in (0, 1]"),
    # replica counts and resources
    ({"prefill": {"replicas": "4:1"}}, "prefill.replicas: min 4 is above max 1"),
    ({"prefill": {"replicas": "1:2:3"}}, "prefill.replicas: expected a count or 'MIN:MAX'"),
    ({"decode": {"replicas": -1}}, "decode.replicas: replica counts must be >= 0"),
    ({"decode": {"replicas": 0}}, "decode.replicas: the pool needs at least one replica"),
    ({"decode": {"ray_resources": {"dnode": -1}}}, "decode.ray_resources: 'dnode'"),
    ({"model": {"served_model_name": ["a", "a"]}}, "model.served_model_name: names must differ"),
    # across keys
    ({"router": {"http_port": 9000}}, "router: http_port and grpc_port must differ"),
    ({"prefill": {"max_batch_tokens": 24}}, "prefill.max_batch_tokens (24) must be a multiple of kv_cache.block_size"),
])
def test_every_refusal_names_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        load_config(data)
    assert message in str(error.value)


def test_a_colocated_deployment_needs_no_prefill_or_decode_replicas():
    config = load_config({"colocated": {"replicas": 2}, "prefill": {"replicas": 0}, "decode": {"replicas": 0}})
    assert config.is_colocated


def test_dotted_overrides_beat_the_mapping_and_none_leaves_it():
    config = load_config({"prefill": {"replicas": 2, "max_batch_tokens": 512}},
                         **{"prefill.replicas": "1:3", "prefill.max_batch_tokens": None, "router__grpc_port": 9100})
    assert config.prefill.replicas == ReplicaRange(1, 3) and config.prefill.max_batch_tokens == 512
    assert config.router.grpc_port == 9100


def test_yaml_files(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {cache_dir: /data/cache}\ndecode: {max_running: 8}\nengine: {gemv_max_rows: 0}\n")
    config = load_config_file(path, **{"decode.max_running": 16})
    assert (config.model.cache_dir, config.decode.max_running, config.engine.gemv_max_rows) == ("/data/cache", 16, 0)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == PdserveConfig()


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "the top level must be a mapping"),
                                           ("a: [\n", "not valid YAML")])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "missing.yaml")


def test_serve_flags_land_on_their_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("decode: {replicas: 3}\nrouter: {http_port: 8100}\n")
    args = make_parser().parse_args([
        "serve", "--config", str(path), "--model", "/m", "--cache-dir", "/c", "--prefill-replicas", "1:4",
        "--decode-tp", "2", "--http-port", "8200", "--grpc-port", "9200", "--router-replicas", "2",
        "--api-key", "k", "--slo-ttft-ms", "500", "--slo-tpot-ms", "40", "--upscale-delay-s", "5",
        "--downscale-delay-s", "50"])
    config = serve_config(args)
    assert (config.model.path, config.model.cache_dir) == ("/m", "/c")
    assert config.prefill.replicas == ReplicaRange(1, 4) and config.decode.replicas == ReplicaRange(3, 3)
    assert config.decode.tensor_parallel_size == 2
    assert (config.router.http_port, config.router.grpc_port, config.router.replicas) == (8200, 9200, 2)
    assert config.router.api_key == "k"
    assert (config.slo.ttft_ms, config.slo.tpot_ms) == (500.0, 40.0)
    assert (config.autoscaling.upscale_delay_s, config.autoscaling.downscale_delay_s) == (5.0, 50.0)


def test_the_api_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    assert serve_config(make_parser().parse_args(["serve"])).router.api_key == "from-env"


def test_pdserve_serve_refuses_a_bad_config_with_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("decode: {max_runing: 8}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "pdserve: bad configuration: decode: unknown key(s) ['max_runing']" in capsys.readouterr().err


def test_every_section_is_a_frozen_dataclass():
    for section in dataclasses.fields(PdserveConfig):
        value = getattr(PdserveConfig(), section.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
