"""The Helm chart rendered offline, and what the chart tests read from it.

Helm itself runs in-process through helm-python-sdk (Helm v4's Go SDK as a
shared library in the wheel: lint, schema validation and rendering are offline).
The chart tests check the rendered manifests against:
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
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from pdserve.cluster import config as pdserve_config

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


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
