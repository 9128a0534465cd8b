"""The rendered manifests: lint, the Kubernetes and KubeRay schemas, groups, ports, labels, NCCL, models."""
from __future__ import annotations

import helm_python as helm
import pytest

from chart_render import (
    CHART_DIR, KUBE_VERSION, NAMESPACE, RELEASE, VALUE_SETS, objects, pdserve_args, pod_templates, ray_container,
    render, env_of, the_rayservice, validate_core, worker_groups,
)


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

