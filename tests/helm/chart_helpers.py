"""Rendering the chart with Helm's own engine (helm-python-sdk) and validating what it renders:
built-in kinds against Kubernetes' JSON schemas (kubernetes-validate, strict: unknown fields
rejected), the RayService against KubeRay's CRD, the monitors against a pinned subset of the
Prometheus operator's CRDs."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "helm" / "longctx"
KUBERAY_SCHEMAS = Path(__file__).parent / "fixtures" / "kuberay"
MONITORING_SUBSET = Path(__file__).parent / "fixtures" / "monitoring.coreos.com_v1_subset.json"
KUBERNETES_VERSION = "1.31"
RELEASE, NAMESPACE = "demo", "ml"

# The installs operators run; every test over "each scenario" renders all of them.
SCENARIOS = {
    "defaults": {},
    "one GPU": {"workers": {"gpusPerPod": 1, "acceleratorType": "L4"}, "kvTiers": {"hostBytes": 1 << 30}},
    "TP=8 on one node": {"parallel": {"tensorParallelSize": 8}, "workers": {"gpusPerPod": 8, "cpu": "32",
                                                                             "memory": "512Gi"}},
    "TP x SP over 2 nodes": {"parallel": {"tensorParallelSize": 8, "sequenceParallelSize": 2},
                             "workers": {"gpusPerPod": 8, "nodesPerReplica": 2, "cpu": "32", "acceleratorType": "H200"},
                             "serve": {"numReplicas": 2}},
    "external Redis over TLS": {"redis": {"mode": "external", "urls": ["rediss://redis.example:6380/0"],
                                          "password": {"existingSecret": "redis-auth"},
                                          "tls": {"enabled": True, "existingSecret": "redis-ca"}}},
    "monitoring off": {"monitoring": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False},
                                      "dashboards": {"enabled": False}}},
    "object store, autoscaling, ingress, API key": {
        "model": {"source": "objectStore", "objectStore": {"uri": "s3://models/llama/", "credentialsSecret": "s3"}},
        "serve": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6},
                  "apiKey": {"existingSecret": "longctx-api"}},
        "ingress": {"enabled": True, "className": "nginx", "hosts": ["llm.example.com"],
                    "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
        "redis": {"persistence": {"enabled": True}, "tls": {"enabled": True, "existingSecret": "redis-tls"}},
    },
}


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with these values (over values.yaml), NOTES.txt left out."""
    files = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            objects += [document for document in yaml.safe_load_all(text) if document]
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    return chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)["longctx/templates/NOTES.txt"]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (item,) = by_kind(objects, kind)
    return item


def serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


def validate(item: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError (or kubernetes_validate's) naming the offending field."""
    group = item["apiVersion"].split("/")[0]
    if group == "ray.io":
        _crd_validator(KUBERAY_SCHEMAS / f"ray.io_{item['kind'].lower()}s.yaml").validate(item)
    elif group == "monitoring.coreos.com":
        jsonschema.Draft7Validator(_monitoring_schemas()[item["kind"]]).validate(item)
    else:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


@functools.cache
def _monitoring_schemas() -> dict[str, Any]:
    return json.loads(MONITORING_SUBSET.read_text())


@functools.cache
def _crd_validator(path: Path) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(path.read_text())
    (version,) = [version for version in crd["spec"]["versions"] if version.get("storage")]
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def _closed(schema: Any) -> Any:
    """openAPIV3Schema as a JSON Schema that rejects unknown fields, as the API server prunes or
    (with kubectl's field validation) rejects them; `nullable` becomes a null type."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _closed(value) for key, value in schema.items()}
    if "properties" in result and "additionalProperties" not in result \
            and not result.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    if result.pop("nullable", False) and "type" in result:
        result["type"] = [result["type"], "null"]
    return result
