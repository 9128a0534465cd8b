"""The chart's values: documented, reaching the manifests, rendering as documented; bad ones refused clearly."""
from __future__ import annotations

import helm_python as helm
import pytest
import yaml

from chart_render import (
    BAD_VALUE_SETS, CHART_DIR, KUBE_VERSION, ROOT, notes, objects, pdserve_args, pod_templates, ray_container,
    render, serve_config, the_rayservice, worker_groups,
)



def test_every_documented_value_reaches_the_manifests(chart):
    values = {
        "image": {"repository": "registry.example.com/ml/pdserve", "tag": "7.7.7-rc1"},
        "model": {"pvc": "weights", "path": "/mnt/models/qwen2"},
        "prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 6, "gpusPerReplica": 4},
        "decode": {"replicas": 3, "minReplicas": 2, "maxReplicas": 5, "gpusPerReplica": 2},
        "slo": {"ttftMs": 250, "tpotMs": 40},
        "router": {"httpPort": 8001, "grpcPort": 9001},
    }
    manifests = render(chart, values)
    rayservice = the_rayservice(manifests)
    args, serve = pdserve_args(rayservice), serve_config(rayservice)
    groups, templates = worker_groups(rayservice), pod_templates(rayservice)

    images = {c["image"] for t in templates.values() for c in t["spec"]["containers"]}
    images |= {c["image"] for o in objects(manifests) if o["kind"] == "Pod" for c in o["spec"]["containers"]}
    assert images == {"registry.example.com/ml/pdserve:7.7.7-rc1"}
    assert args["model"]["path"] == "/mnt/models/qwen2"
    assert templates["decode"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "weights"
    for name, (initial, low, high, gpus) in {"prefill": (2, 1, 6, 4), "decode": (3, 2, 5, 2)}.items():
        assert (groups[name]["replicas"], groups[name]["minReplicas"], groups[name]["maxReplicas"]) == (initial, low, high)
        assert ray_container(templates[name])["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert args[name]["replicas"] == f"{low}:{high}"
        assert args[name]["gpus_per_replica"] == gpus
    assert args["slo"] == {"ttft_ms": 250, "tpot_ms": 40}
    assert (args["router"]["http_port"], args["router"]["grpc_port"]) == (8001, 9001)
    assert serve["proxy_location"] == "Disabled"  # the router replicas listen on the ports themselves
    assert "8001" in notes(manifests) and "9001" in notes(manifests)


def test_defaults_render_as_documented(chart):
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert defaults["model"]["path"] == "/models/default"
    manifests = render(chart)
    args = pdserve_args(the_rayservice(manifests))
    assert args["model"]["path"] == defaults["model"]["path"]
    assert (args["router"]["http_port"], args["router"]["grpc_port"]) == (8000, 9000)
    assert args["prefill"]["replicas"] == args["decode"]["replicas"] == 1
    text = notes(manifests)
    assert "svc/demo-pdserve-serve-svc 8000:8000 9000:9000" in text
    assert "pdserve.v1.Generation/Generate" in text and "/v1/chat/completions" in text


def test_every_value_is_documented_in_the_readme():
    readme = (ROOT / "helm" / "README.md").read_text()
    for key in (
        "image.repository", "image.tag", "model.path", "model.servedModelName", "model.pvc",
        "prefill.replicas", "prefill.minReplicas", "prefill.maxReplicas", "prefill.gpusPerReplica",
        "decode.replicas", "decode.minReplicas", "decode.maxReplicas", "decode.gpusPerReplica",
        "slo.ttftMs", "slo.tpotMs", "router.httpPort", "router.grpcPort",
    ):
        assert f"`{key}`" in readme, key


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(("values", "message"), BAD_VALUE_SETS.values(), ids=BAD_VALUE_SETS.keys())
def test_bad_values_fail_with_a_clear_message(chart, values, message):
    with pytest.raises(helm.HelmError) as failure:
        render(chart, values)
    assert message in str(failure.value), str(failure.value)


def test_lint_refuses_values_the_schema_refuses():
    # Lint applies values.schema.json. (Helm's lint mode logs a template `fail`
    # instead of failing, so the checks of _helpers.tpl stop `helm template` and
    # `helm install`, as tested above, but not `helm lint`.)
    values, message = BAD_VALUE_SETS["negative replicas"]
    report = helm.lint(str(CHART_DIR), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any(message in error for error in report["errors"]), report

