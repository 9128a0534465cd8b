"""`pdserve serve ORG/NAME`, as vLLM users write it: a Hugging Face model id read from the local cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from hf_cache import cache_with
from pdserve.cluster.cli import make_parser, serve_config
from pdserve.cluster.deployments import served_models
from pdserve.cluster.rank_process import model_dir, tokenizer_dir
from pdserve.cluster.server import prepare
from pdserve.engine.loader import ModelLoadError, resolve_model_path


def test_a_directory_is_itself_and_a_model_id_is_its_cached_snapshot(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_with(chat_model[0], tmp_path / "hub", "tiny-org/tiny-chat")
    assert resolve_model_path(str(chat_model[0])) == chat_model[0]
    assert resolve_model_path("tiny-org/tiny-chat", download_dir=str(tmp_path / "hub")) == snapshot
    assert resolve_model_path("tiny-org/tiny-chat", "main", str(tmp_path / "hub")) == snapshot


def test_a_model_id_missing_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="tiny-org/absent: no such directory, and not in the Hugging Face cache"):
        resolve_model_path("tiny-org/absent", download_dir=str(tmp_path))


def test_paths_are_never_taken_for_model_ids(tmp_path):
    for path in ("./absent", "~/absent", "/models/absent", "a/b/c"):
        assert resolve_model_path(path) == Path(path).expanduser()


def test_serve_reads_the_id_from_the_cache_and_serves_it_under_that_name(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_with(chat_model[0], tmp_path / "hub", "tiny-org/tiny-chat")
    args = make_parser().parse_args(["serve", "tiny-org/tiny-chat", "--download-dir", str(tmp_path / "hub"),
                                     "--revision", "main"])
    config = prepare(serve_config(args), joining=False)
    assert served_models(config).names == ("tiny-org/tiny-chat",)
    assert model_dir(config) == str(snapshot)  # where each replica loads it from


def test_the_tokenizer_comes_from_its_own_directory_or_id_when_named(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_with(chat_model[0], tmp_path / "hub", "tiny-org/tokenizer")
    named = serve_config(make_parser().parse_args(["serve", str(chat_model[0]), "--tokenizer", "tiny-org/tokenizer",
                                                   "--download-dir", str(tmp_path / "hub")]))
    assert tokenizer_dir(named) == str(snapshot)
    assert tokenizer_dir(serve_config(make_parser().parse_args(["serve", str(chat_model[0])]))) == str(chat_model[0])
