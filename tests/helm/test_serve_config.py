"""The serve config the chart writes: valid for Ray Serve and for pdserve's own schema, unchanged by a round trip."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json

import pytest

from chart_render import (
    VALUE_SETS, pdserve_args, pdserve_config, pdserve_knows_ray_resources, pool_sections, render, serve_config,
    the_rayservice,
)



@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_serve_config_is_valid_for_ray_serve_and_pdserve(chart, values):
    from ray.serve.schema import ServeDeploySchema

    rayservice = the_rayservice(render(chart, values))
    config = serve_config(rayservice)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "pdserve.cluster.app:build_app"
    assert app["route_prefix"] == "/"
    assert config["proxy_location"] == "Disabled" and "http_options" not in config
    assert app["args"]["router"]["http_host"] == "0.0.0.0"

    args = copy.deepcopy(app["args"])
    if not pdserve_knows_ray_resources():  # see test_pools_are_pinned_through_a_pdserve_config_key
        for section in pool_sections(args):
            section.pop("ray_resources", None)
    loaded = pdserve_config.load_config(args)
    assert not loaded.is_colocated
    # The args are pdserve's own: loading and writing them back changes nothing.
    assert pdserve_config.load_config(loaded.to_dict()) == loaded


def test_pools_are_pinned_through_a_pdserve_config_key(chart):
    args = pdserve_args(the_rayservice(render(chart)))
    assert args["prefill"]["ray_resources"] == {"prefill": 1}
    assert args["decode"]["ray_resources"] == {"decode": 1}
    assert args["router"]["ray_resources"] == {"router": 1}
    if not pdserve_knows_ray_resources():
        pytest.skip(
            "pdserve.cluster.config has no `ray_resources` key under prefill/decode/router yet: "
            "the chart's default serve config needs it (placement.pinPoolsToGroups=false renders without it)"
        )
    loaded = pdserve_config.load_config(args)
    assert loaded.prefill.ray_resources == {"prefill": 1}


def test_unpinned_pools_need_no_new_config_key(chart):
    args = pdserve_args(the_rayservice(render(chart, VALUE_SETS["pools not pinned"])))
    assert all("ray_resources" not in section for section in pool_sections(args))
    pdserve_config.load_config(args)  # strictly, with today's schema


def test_replica_ranges_stay_strings_in_the_serve_config(chart):
    # YAML 1.1 would read an unquoted 1:4 as the base-60 number 64.
    raw = the_rayservice(render(chart, VALUE_SETS["autoscaled pools"]))["spec"]["serveConfigV2"]
    args = json.loads(raw)["applications"][0]["args"]  # serveConfigV2 is JSON
    assert args["prefill"]["replicas"] == "1:4" and args["decode"]["replicas"] == "0:8"
    for section in pool_sections(args):
        section.pop("ray_resources", None)
    loaded = pdserve_config.load_config(args)
    assert (loaded.prefill.replicas.min, loaded.prefill.replicas.max) == (1, 4)
    assert (loaded.decode.replicas.min, loaded.decode.replicas.max) == (0, 8)


def test_import_path_imports_without_side_effects():
    module_name, _, attr = "pdserve.cluster.app:build_app".partition(":")
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet: the serve config's import_path cannot be checked")
    import ray

    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))
    assert not ray.is_initialized(), f"importing {module_name} started Ray"




def test_autoscaled_pools_get_pdserves_application_policy(chart):
    from pdserve.cluster.autoscaling import PdserveAutoscalingPolicy
    from pdserve.cluster.config import load_config

    (app,) = serve_config(the_rayservice(render(chart, VALUE_SETS["autoscaled pools"])))["applications"]
    policy = app["autoscaling_policy"]
    module, name = policy["policy_function"].split(":")
    assert getattr(importlib.import_module(module), name) is PdserveAutoscalingPolicy
    assert load_config(policy["policy_kwargs"]["config"]) == load_config(app["args"])
    (fixed,) = serve_config(the_rayservice(render(chart, VALUE_SETS["fixed pools"])))["applications"]
    assert "autoscaling_policy" not in fixed
