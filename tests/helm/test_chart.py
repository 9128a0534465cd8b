"""The Helm chart (helm/pdserve), checked with no cluster and no helm binary.

Helm itself runs in-process through helm-python-sdk (Helm v4's Go SDK as a
shared library in the wheel: lint, schema validation and rendering are offline).
The rendered manifests are checked against:
  - the Kubernetes schemas shipped in kubernetes-validate (core objects, and the
    pod templates and Service embedded in the RayService);
  - KubeRay v1.7.0's RayService CRD schema (tests/helm/schemas/, made from
    ray-operator/config/crd/bases/ray.io_rayservices.yaml at tag v1.7.0 with the
    descriptions and `status` dropped), strictly: an unknown field fails;
  - Ray Serve's own config schema (ray.serve.schema.ServeDeploySchema);
  - pdserve's own config validation (pdserve.cluster.config.load_config).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) is not installed")

from pdserve.cluster import config as pdserve_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "pdserve"
CRD_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-v1.7.0-rayservice.schema.json"
KUBE_VERSION = "1.36.0"  # a current Kubernetes release, for lint and the core schemas
RELEASE, NAMESPACE = "demo", "serving"

# Value sets that must render (and lint) cleanly.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fixed pools": {
        "prefill": {"replicas": 3, "gpusPerReplica": 2},
        "decode": {"replicas": 2, "gpusPerReplica": 1},
    },
    "autoscaled pools": {
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
        "decode": {"replicas": 2, "minReplicas": 0, "maxReplicas": 8},
    },
    "pvc model": {"model": {"pvc": "llama-weights", "path": "/mnt/models/llama-3-8b-instruct"}},
    "served model names": {"model": {"servedModelName": ["llama-3-8b", "meta-llama/Llama-3.1-8B-Instruct"]}},
    "other ports": {"router": {"httpPort": 18000, "grpcPort": 19000}},
    "hub download, opted in": {"model": {"hub": {"repo": "org/model", "tokenSecret": "hf-token"}}},
    "pools not pinned": {"placement": {"pinPoolsToGroups": False}},
    "scheduling and nccl": {
        "prefill": {"nodeSelector": {"gpu-class": "compute"},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "prefill", "effect": "NoSchedule"}]},
        "decode": {"nodeSelector": {"gpu-class": "bandwidth"}},
        "nccl": {"socketIfname": "eth0", "ibDisable": True, "extraEnv": {"NCCL_CROSS_NIC": "1"}},
        "config": {"kv_cache": {"memory_fraction": 0.85}, "transfer": {"backend": "nccl"}},
        "service": {"type": "LoadBalancer"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
}

# Value sets that must fail, and a piece of the message that must say why.
BAD_VALUE_SETS: dict[str, tuple[dict[str, Any], str]] = {
    "negative replicas": ({"prefill": {"replicas": -1}}, "/prefill/replicas"),
    "negative minReplicas": ({"decode": {"minReplicas": -2, "maxReplicas": 2}}, "/decode/minReplicas"),
    "min above max": (
        {"decode": {"replicas": 1, "minReplicas": 3, "maxReplicas": 1}},
        "decode.minReplicas (3) is above decode.maxReplicas (1)",
    ),
    "min without max": ({"prefill": {"minReplicas": 1}}, "prefill.minReplicas and prefill.maxReplicas go together"),
    "initial size outside the range": (
        {"prefill": {"replicas": 5, "minReplicas": 1, "maxReplicas": 4}},
        "prefill.replicas (5), the initial size, must lie within",
    ),
    "empty fixed pool": ({"decode": {"replicas": 0}}, "decode.replicas: a fixed pool needs at least one replica"),
    "no GPU": ({"prefill": {"gpusPerReplica": 0}}, "/prefill/gpusPerReplica"),
    "no model given (empty path)": ({"model": {"path": ""}}, "no model given"),
    "no model given (null path)": ({"model": {"path": None}}, "no model given"),
    "an empty served model name": ({"model": {"servedModelName": [""]}}, "/model/servedModelName/0"),
    "hub download without a token secret": (
        {"model": {"hub": {"repo": "org/model"}}}, "opt in by also setting model.hub.tokenSecret",
    ),
    "pvc model outside the mount": (
        {"model": {"pvc": "weights", "path": "/models/default"}},
        "model.path (/models/default) must lie under model.pvcMountPath (/mnt/models)",
    ),
    "http port out of range": ({"router": {"httpPort": 70000}}, "/router/httpPort"),
    "grpc port out of range": ({"router": {"grpcPort": 0}}, "/router/grpcPort"),
    "same port twice": ({"router": {"httpPort": 9000, "grpcPort": 9000}}, "router.httpPort and router.grpcPort must differ"),
    "port of the Ray dashboard": ({"router": {"httpPort": 8265}}, "router.httpPort (8265) is taken by Ray's dashboard"),
    "a chart value set through config": (
        {"config": {"prefill": {"replicas": 4}}}, "config.prefill.replicas has its own chart value",
    ),
    "colocated mode": ({"config": {"colocated": {"replicas": 2}}}, "colocated mode is not supported"),
    "misspelt value": ({"prefil": {"replicas": 2}}, "prefil"),
    "non-positive SLO": ({"slo": {"ttftMs": 0}}, "/slo/ttftMs"),
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Template path -> the Kubernetes objects it renders (NOTES.txt as a string)."""
    rendered = chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    out: dict[str, Any] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            out[path] = text
        else:
            out[path] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def objects(manifests) -> list[dict[str, Any]]:
    return [doc for docs in manifests.values() if isinstance(docs, list) for doc in docs]


def notes(manifests) -> str:
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def the_rayservice(manifests) -> dict[str, Any]:
    found = [o for o in objects(manifests) if o["kind"] == "RayService"]
    assert len(found) == 1, f"expected one RayService, got {len(found)}"
    return found[0]


def serve_config(rayservice) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def pdserve_args(rayservice) -> dict[str, Any]:
    (app,) = serve_config(rayservice)["applications"]
    return app["args"]


def worker_groups(rayservice) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def pod_templates(rayservice) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({name: g["template"] for name, g in worker_groups(rayservice).items()})
    return templates


def ray_container(template) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pool_sections(args) -> list[dict[str, Any]]:
    return [args.get(section, {}) for section in ("prefill", "decode", "router")]


def pdserve_knows_ray_resources() -> bool:
    return all(
        "ray_resources" in {f.name for f in dataclasses.fields(cls)}
        for cls in (pdserve_config.PrefillPoolConfig, pdserve_config.DecodePoolConfig, pdserve_config.RouterConfig)
    )


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields (the API server would prune them silently)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_passes_without_warnings(values):
    report = helm.lint(str(CHART_DIR), values, strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], report


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_validates(chart, values, rayservice_validator):
    manifests = render(chart, values)
    kinds = sorted(o["kind"] for o in objects(manifests))
    assert kinds == ["Pod", "RayService"]  # the RayService, and the `helm test` pod
    for obj in objects(manifests):
        if obj["apiVersion"] == "ray.io/v1":
            errors = sorted(rayservice_validator.iter_errors(obj), key=str)
            assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
        else:
            validate_core(obj)
    rayservice = the_rayservice(manifests)
    for name, template in pod_templates(rayservice).items():
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})
    validate_core({"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]})


def test_rayservice_has_a_cpu_head_and_a_gpu_group_per_pool(chart):
    rayservice = the_rayservice(render(chart))
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert list(worker_groups(rayservice)) == ["prefill", "decode"]

    head = ray_container(cluster["headGroupSpec"]["template"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    for name, group in worker_groups(rayservice).items():
        limits = ray_container(group["template"])["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1, name
        # Each group advertises its own Ray resource, which its pool asks for.
        assert group["resources"] == {name: "1"}
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == name
    assert cluster["headGroupSpec"]["resources"] == {"router": "100"}


def test_worker_group_ranges_follow_the_pools(chart):
    groups = worker_groups(the_rayservice(render(chart, VALUE_SETS["autoscaled pools"])))
    assert (groups["prefill"]["replicas"], groups["prefill"]["minReplicas"], groups["prefill"]["maxReplicas"]) == (1, 1, 4)
    assert (groups["decode"]["replicas"], groups["decode"]["minReplicas"], groups["decode"]["maxReplicas"]) == (2, 0, 8)

    groups = worker_groups(the_rayservice(render(chart, VALUE_SETS["fixed pools"])))
    assert (groups["prefill"]["replicas"], groups["prefill"]["minReplicas"], groups["prefill"]["maxReplicas"]) == (3, 3, 3)
    assert (groups["decode"]["replicas"], groups["decode"]["minReplicas"], groups["decode"]["maxReplicas"]) == (2, 2, 2)


def test_services_and_ports(chart):
    rayservice = the_rayservice(render(chart, VALUE_SETS["other ports"]))
    service = rayservice["spec"]["serveService"]
    assert service["metadata"]["name"] == "demo-pdserve-serve-svc"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["serve"]["port"], ports["serve-grpc"]["port"]) == (18000, 19000)
    assert ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    # KubeRay builds the serve Service from head ports named serve / serve-*.
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(pod_templates(rayservice)["head"])["ports"]}
    assert (head_ports["serve"], head_ports["serve-grpc"]) == (18000, 19000)
    for name in ("prefill", "decode"):
        probe = ray_container(pod_templates(rayservice)[name])["readinessProbe"]
        assert "local_raylet_healthz" in " ".join(probe["exec"]["command"])  # no router, no Serve port there
    # The head has no probe of ours: KubeRay deploys the app only once the head is ready.
    assert "readinessProbe" not in ray_container(pod_templates(rayservice)["head"])


def test_standard_labels_on_every_object_and_pod(chart):
    manifests = render(chart, {"image": {"tag": "1.2.3"}})
    on_pods = {
        "app.kubernetes.io/name": "pdserve",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": "1.2.3",
    }
    on_objects = on_pods | {"helm.sh/chart": "pdserve-0.1.0", "app.kubernetes.io/managed-by": "Helm"}
    rayservice = the_rayservice(manifests)
    for metadata in [o["metadata"] for o in objects(manifests)] + [rayservice["spec"]["serveService"]["metadata"]]:
        assert on_objects.items() <= metadata["labels"].items(), metadata
    for name, template in pod_templates(rayservice).items():
        labels = template["metadata"]["labels"]
        assert on_pods.items() <= labels.items(), name
        # A chart version bump alone must not change the pods (KubeRay would make a new cluster).
        assert "helm.sh/chart" not in labels, name


def test_nccl_settings_reach_the_worker_containers(chart):
    rayservice = the_rayservice(render(chart, VALUE_SETS["scheduling and nccl"]))
    for name in ("prefill", "decode"):
        env = env_of(ray_container(pod_templates(rayservice)[name]))
        assert env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["NCCL_IB_DISABLE"] == "1"
        assert env["NCCL_NVLS_ENABLE"] == "0"
        assert env["NCCL_DEBUG"] == "WARN"
        assert env["NCCL_CROSS_NIC"] == "1"
    templates = pod_templates(rayservice)
    assert templates["prefill"]["spec"]["nodeSelector"] == {"gpu-class": "compute"}
    assert templates["decode"]["spec"]["nodeSelector"] == {"gpu-class": "bandwidth"}
    assert templates["prefill"]["spec"]["tolerations"][0]["value"] == "prefill"


def test_model_sources(chart):
    # Default: the model baked into the image, and no hub access at run time.
    rayservice = the_rayservice(render(chart))
    assert pdserve_args(rayservice)["model"]["path"] == "/models/default"
    for template in pod_templates(rayservice).values():
        assert env_of(ray_container(template))["HF_HUB_OFFLINE"] == "1"
        assert "volumes" not in template["spec"] and "initContainers" not in template["spec"]

    # A PVC, mounted read-only on every pod (the router needs the tokenizer too).
    rayservice = the_rayservice(render(chart, VALUE_SETS["pvc model"]))
    assert pdserve_args(rayservice)["model"]["path"] == "/mnt/models/llama-3-8b-instruct"
    for template in pod_templates(rayservice).values():
        assert template["spec"]["volumes"] == [
            {"name": "model", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}}
        ]
        assert ray_container(template)["volumeMounts"] == [{"name": "model", "mountPath": "/mnt/models", "readOnly": True}]

    # The hub only when opted in with a token secret: an init container downloads.
    rayservice = the_rayservice(render(chart, VALUE_SETS["hub download, opted in"]))
    for template in pod_templates(rayservice).values():
        (init,) = template["spec"]["initContainers"]
        token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert "HF_HUB_OFFLINE" not in env_of(ray_container(template))
    assert pdserve_args(rayservice)["model"]["path"] == "/models/hub/model"
    assert pdserve_args(rayservice)["model"]["served_model_name"] == ["org/model"]  # not the download directory


def test_served_model_names_reach_the_config_and_default_to_the_path(chart):
    assert "served_model_name" not in pdserve_args(the_rayservice(render(chart)))["model"]
    names = VALUE_SETS["served model names"]["model"]["servedModelName"]
    rayservice = the_rayservice(render(chart, VALUE_SETS["served model names"]))
    assert pdserve_args(rayservice)["model"]["served_model_name"] == names


def test_every_documented_value_reaches_the_manifests(chart):
    values = {
        "image": {"repository": "registry.example.com/ml/pdserve", "tag": "7.7.7-rc1"},
        "model": {"pvc": "weights", "path": "/mnt/models/qwen2"},
        "prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 6, "gpusPerReplica": 4},
        "decode": {"replicas": 3, "minReplicas": 2, "maxReplicas": 5, "gpusPerReplica": 2, "tensorParallelSize": 2},
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
    # a pod holds one pool replica: every TP rank's GPUs
    for name, (initial, low, high, gpus, tp) in {"prefill": (2, 1, 6, 4, 1), "decode": (3, 2, 5, 2, 2)}.items():
        assert (groups[name]["replicas"], groups[name]["minReplicas"], groups[name]["maxReplicas"]) == (initial, low, high)
        assert ray_container(templates[name])["resources"]["limits"]["nvidia.com/gpu"] == gpus * tp
        assert args[name]["replicas"] == f"{low}:{high}"
        assert args[name]["gpus_per_replica"] == gpus
        assert args[name]["tensor_parallel_size"] == tp
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


# ---------------------------------------------------------------- the serve config


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
