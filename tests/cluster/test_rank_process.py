"""A replica process starts as its config says: the model cache, the GIL switch interval, the GEMV bound."""
from __future__ import annotations

import sys

import pytest

from pdserve.cluster.config import load_config
from pdserve.cluster.rank_process import build_runner, load_rank_model, model_dir
from pdserve.engine import linear
from pdserve.engine.loader import DEFAULT_MODEL_NAME
from pdserve.engine.parallel import TensorParallel
from tiny_models import save_tiny_model


def _unpacked_default_model(root):
    """A cache holding the embedded model already (so nothing is dequantised here)."""
    target = root / "models" / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").touch()
    return target


def test_the_embedded_model_is_found_in_model_cache_dir_then_pdserve_cache(tmp_path, monkeypatch):
    configured, from_env = _unpacked_default_model(tmp_path / "a"), _unpacked_default_model(tmp_path / "b")
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "b"))
    assert model_dir(load_config({"model": {"cache_dir": str(tmp_path / "a")}})) == str(configured)
    assert model_dir(load_config()) == str(from_env)
    assert model_dir(load_config({"model": {"path": "/m", "cache_dir": str(tmp_path / "a")}})) == "/m"


@pytest.fixture
def process_settings():
    """The process-wide settings a replica writes, put back after the test."""
    interval, rows = sys.getswitchinterval(), linear.GEMV_MAX_ROWS
    yield
    sys.setswitchinterval(interval)
    linear.set_gemv_max_rows(rows)


def test_a_rank_process_takes_the_engine_section(tmp_path, process_settings):
    save_tiny_model("llama", tmp_path)
    config = load_config({"model": {"path": str(tmp_path)}, "engine": {"gemv_max_rows": 0, "gil_switch_interval_s": 0.002}})
    loaded = load_rank_model(config, TensorParallel.single())
    assert loaded.spec.num_layers > 0
    assert sys.getswitchinterval() == pytest.approx(0.002) and linear.GEMV_MAX_ROWS == 0


def test_the_engines_own_gemv_bound_stays_unless_the_config_sets_one(tmp_path, process_settings):
    save_tiny_model("llama", tmp_path)
    shipped = linear.GEMV_MAX_ROWS
    load_rank_model(load_config({"model": {"path": str(tmp_path)}}), TensorParallel.single())
    assert linear.GEMV_MAX_ROWS == shipped and sys.getswitchinterval() == pytest.approx(0.001)


def test_every_rank_builds_its_runner_as_the_config_says(tmp_path, process_settings):
    """Leader and TP followers alike (a follower once kept the model's KV dtype whatever kv_cache.dtype said)."""
    save_tiny_model("llama", tmp_path)
    config = load_config({"model": {"path": str(tmp_path)}, "kv_cache": {"dtype": "fp8_e4m3"},
                          "engine": {"cuda_graphs": False}})
    runner = build_runner(config, load_rank_model(config, TensorParallel.single()), 32, TensorParallel.single())
    assert runner.kv_cache.spec.is_fp8 and runner.kv_cache.spec.num_blocks == 32
    assert runner.decode_graphs is None and runner.prefill_graphs is None
