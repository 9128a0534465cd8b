"""Which names a deployment serves, from the flag, the config file and the defaults."""
from __future__ import annotations

import pytest

from pdserve.cluster.cli import make_parser, serve_config
from pdserve.cluster.config import ConfigError, load_config
from pdserve.cluster.deployments import served_models
from pdserve.cluster.server import prepare


def test_the_model_path_exactly_as_given_is_the_default_name():
    assert served_models(load_config({"model": {"path": "/models/foo/"}})).names == ("/models/foo/",)
    assert served_models(load_config({"model": {"path": "foo"}})).names == ("foo",)


def test_the_embedded_default_model_keeps_its_name_once_its_path_is_filled_in():
    config = prepare(load_config(), joining=True)
    assert config.model.path and served_models(config).names == ("SmolLM2-135M-Instruct",)
    named = prepare(load_config({"model": {"served_model_name": ["smol"]}}), joining=True)
    assert served_models(named).names == ("smol",)


def test_the_flag_takes_several_names_and_replaces_the_default():
    config = serve_config(make_parser().parse_args(["serve", "--model", "/m/llama", "--served-model-name", "llama",
                                                    "/m/llama"]))
    assert served_models(config).names == ("llama", "/m/llama") and served_models(config).primary == "llama"
    assert load_config(config.to_dict()) == config  # as the replicas get it, through Serve's args


def test_the_config_file_takes_one_name_or_a_list():
    assert load_config({"model": {"served_model_name": "llama"}}).model.served_model_name == ("llama",)
    assert load_config({"model": {"served_model_name": ["a", "b"]}}).model.served_model_name == ("a", "b")


@pytest.mark.parametrize("value", [["a", "a"], [""], [3], {"a": 1}])
def test_bad_names_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="model.served_model_name"):
        load_config({"model": {"served_model_name": value}})
