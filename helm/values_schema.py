"""Writes helm/longctx/values.schema.json: `python helm/values_schema.py`.

The schema is written from Python because one of its rules is a table: JSON Schema cannot
multiply, so "the GPUs of a replica's pods add up to TP x SP" becomes one if/then per (TP, SP)
pair listing the (gpusPerPod, nodesPerReplica) that give that product. Everything else is plain
JSON Schema (draft 7, what Helm checks values against); unknown keys are rejected everywhere
except in free-form maps (labels, annotations, node selectors, extraConfig). The queued-context
autoscaling values take their types, ranges and defaults from cluster/config.py itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# This checkout's cluster/config.py, not whichever one the interpreter has installed.
sys.path.insert(0, str(Path(__file__).parents[1]))

from cluster.config import AutoscalingSettings

SCHEMA_PATH = Path(__file__).parent / "longctx" / "values.schema.json"
# serve.autoscaling values that are keys of the config's autoscaling section (the template maps
# them the same way); queuedContext's are the policy's main knobs, extraConfig reaches the rest.
AUTOSCALING_BOUNDS = {"minReplicas": "min_replicas", "maxReplicas": "max_replicas"}
QUEUED_CONTEXT_KNOBS = {"ttftTargetS": "ttft_target_s", "spareReplicas": "spare_replicas",
                        "replicaStartupS": "replica_startup_s", "downscaleDelayS": "downscale_delay_s"}
NAMED_POLICIES = ("queuedContext", "ongoingRequests")
PARALLEL_SIZES = (1, 2, 4, 8, 16, 32)
GPUS_PER_POD = (1, 2, 4, 8)
NODES_PER_REPLICA = (1, 2, 4, 8, 16, 32)

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
FREE_MAP = {"type": "object"}
LIST = {"type": "array"}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"}
DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}


def positive(kind: str = "integer") -> dict[str, Any]:
    return {"type": kind, "exclusiveMinimum": 0}


def non_negative(kind: str = "integer") -> dict[str, Any]:
    return {"type": kind, "minimum": 0}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object with exactly these keys (all optional unless required)."""
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def enum(*values: Any) -> dict[str, Any]:
    return {"enum": list(values)}


def autoscaling_setting(name: str) -> dict[str, Any]:
    """An AutoscalingSettings field's type, range and default, so that the chart's value cannot
    accept what the config refuses, and a test can hold values.yaml to the config's default."""
    field = AutoscalingSettings.model_json_schema()["properties"][name]
    return {key: field[key] for key in ("type", "minimum", "exclusiveMinimum", "maximum", "default") if key in field}


def autoscaling() -> dict[str, Any]:
    # anyOf, not one pattern: Helm's message then lists the policy names before the import-path form.
    policy = {"anyOf": [enum(*NAMED_POLICIES), {"type": "string", "pattern": "^[\\w.]+:\\w+$"}]}
    return closed({
        "enabled": BOOLEAN, "policy": policy,
        **{key: autoscaling_setting(name) for key, name in AUTOSCALING_BOUNDS.items()},
        "queuedContext": closed({key: autoscaling_setting(name) for key, name in QUEUED_CONTEXT_KNOBS.items()}),
        "ongoingRequests": closed({"targetOngoingRequests": positive("number"),
                                   "upscaleDelayS": non_negative("number"),
                                   "downscaleDelayS": non_negative("number")}),
    })


def resources() -> dict[str, Any]:
    amounts = {"type": "object", "additionalProperties": QUANTITY}
    return closed({"requests": amounts, "limits": amounts})


def scheduling() -> dict[str, Any]:
    return {"nodeSelector": {"type": "object", "additionalProperties": STRING}, "tolerations": LIST,
            "affinity": FREE_MAP}


def longctx_sections() -> dict[str, Any]:
    """The options that become the longctx config (cluster/config.py's ranges)."""
    return {
        "model": closed({
            "name": STRING, "source": enum("pvc", "objectStore"), "mountPath": {"type": "string", "pattern": "^/"},
            "pvc": closed({"claimName": STRING, "subPath": STRING}),
            "objectStore": closed({"uri": STRING, "image": STRING, "command": {"type": "array", "items": STRING},
                                   "credentialsSecret": STRING, "sizeLimit": QUANTITY}),
            "dtype": enum("auto", "float32", "bfloat16", "float16"), "maxModelLen": nullable(positive()),
        }),
        "parallel": closed({"tensorParallelSize": enum(*PARALLEL_SIZES),
                            "sequenceParallelSize": enum(*PARALLEL_SIZES)}),
        "cache": closed({"blockSize": {"type": "integer", "minimum": 1, "maximum": 4096},
                         "deviceMemoryFraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                         "enablePrefixCaching": BOOLEAN}),
        "scheduler": closed({"maxNumSeqs": positive(), "maxTokensPerStep": positive(),
                             "maxWaitingRequests": positive()}),
        "serve": closed({
            "numReplicas": positive(), "ingressReplicas": positive(), "ingressNumCpus": non_negative("number"),
            "workerNumCpus": positive("number"), "maxQueuedRequests": positive(), "maxQueuedTokens": positive(),
            "requestTimeoutS": positive("number"), "maxRequestBodyBytes": {"type": "integer", "minimum": 1024},
            "drainTimeoutS": non_negative("number"),
            "apiKey": closed({"existingSecret": STRING, "key": STRING}),
            "autoscaling": autoscaling(),
        }),
        "router": closed({"blockTokens": positive(), "maxTrackedBlocks": positive(),
                          "statsPeriodS": positive("number"), "longPromptTokens": positive(),
                          "shortLanes": non_negative()}),
        "kvTiers": closed({"hostBytes": non_negative(), "restorePolicy": enum("cost", "always", "never"),
                           "redisTtlS": nullable(positive()), "redisWriteThrough": BOOLEAN,
                           "redisKeyPrefix": {"type": "string", "minLength": 1}}),
        "extraConfig": FREE_MAP,
    }


def kubernetes_sections() -> dict[str, Any]:
    """Pods, Redis, exposure and monitoring."""
    return {
        "workers": closed({
            "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "gpusPerPod": enum(*GPUS_PER_POD), "nodesPerReplica": enum(*NODES_PER_REPLICA),
            "acceleratorType": STRING, "gpuResourceName": STRING, "cpu": QUANTITY, "memory": QUANTITY,
            "shmSize": QUANTITY, "idleTimeoutSeconds": non_negative(), "podAnnotations": FREE_MAP, **scheduling(),
        }),
        "head": closed({"cpu": QUANTITY, "memory": QUANTITY, "podAnnotations": FREE_MAP, **scheduling()}),
        "autoscaler": closed({"enabled": BOOLEAN, "upscalingMode": enum("Default", "Conservative", "Aggressive"),
                              "idleTimeoutSeconds": non_negative(), "resources": resources()}),
        "redis": closed({
            "mode": enum("internal", "external", "none"), "image": STRING,
            "maxmemory": {"type": "string", "pattern": "^[0-9]+(b|kb|mb|gb)?$"},
            "maxmemoryPolicy": enum("allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "allkeys-random",
                                    "volatile-ttl"),
            "resources": resources(),
            "persistence": closed({"enabled": BOOLEAN, "size": QUANTITY, "storageClass": STRING}),
            "password": closed({"existingSecret": STRING, "key": STRING}),
            "tls": closed({"enabled": BOOLEAN, "existingSecret": STRING}),
            "urls": {"type": "array", "items": {"type": "string", "pattern": "^(redis|rediss|unix)(\\+sentinel|\\+cluster)?://"}},
            "nodeSelector": {"type": "object", "additionalProperties": STRING}, "tolerations": LIST,
        }),
        "service": closed({"type": enum("ClusterIP", "NodePort", "LoadBalancer"),
                           "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "annotations": FREE_MAP}),
        "ingress": closed({"enabled": BOOLEAN, "className": STRING, "annotations": FREE_MAP,
                           "hosts": {"type": "array", "items": STRING}, "tls": LIST}),
        "podDisruptionBudget": closed({"enabled": BOOLEAN, "maxUnavailable": positive()}),
        "networkPolicy": closed({"enabled": BOOLEAN}),
        "monitoring": closed({
            "serviceMonitor": closed({"enabled": BOOLEAN, "interval": DURATION, "labels": FREE_MAP}),
            "podMonitor": closed({"enabled": BOOLEAN, "interval": DURATION, "labels": FREE_MAP}),
            "dashboards": closed({"enabled": BOOLEAN, "labels": FREE_MAP, "annotations": FREE_MAP}),
        }),
    }


def gpu_shape_fits(tensor: int, sequence: int, gpus_per_pod: int, nodes: int) -> bool:
    if nodes not in NODES_PER_REPLICA or gpus_per_pod * nodes != tensor * sequence:
        return False
    return nodes == 1 or gpus_per_pod % tensor == 0


def gpu_rules() -> list[dict[str, Any]]:
    """For each (TP, SP): gpusPerPod x nodesPerReplica must equal TP x SP, and a replica over
    several pods keeps each TP group inside one (parallel.span_nodes: only SP crosses nodes)."""
    rules = []
    for tensor in PARALLEL_SIZES:
        for sequence in PARALLEL_SIZES:
            world = tensor * sequence
            shapes = [{"properties": {"gpusPerPod": {"const": gpus}, "nodesPerReplica": {"const": world // gpus}}}
                      for gpus in GPUS_PER_POD if gpu_shape_fits(tensor, sequence, gpus, world // gpus)]
            parallel = {"tensorParallelSize": {"const": tensor}, "sequenceParallelSize": {"const": sequence}}
            rules.append({
                "if": {"properties": {"parallel": {"properties": parallel}}},
                "then": {"properties": {"workers": {
                    "description": f"TP x SP = {world}: gpusPerPod x nodesPerReplica must be {world}, and over "
                                   f"several pods a pod holds whole TP groups of {tensor}",
                    "anyOf": shapes or [{"not": {}}]}}},
            })
    return rules


def values_schema() -> dict[str, Any]:
    general = {
        "nameOverride": STRING, "fullnameOverride": {"type": "string", "maxLength": 47},
        "image": closed({"repository": STRING, "tag": STRING, "pullPolicy": enum("Always", "IfNotPresent", "Never")}),
        "imagePullSecrets": LIST, "rayVersion": STRING,
        "podSecurityContext": FREE_MAP, "containerSecurityContext": FREE_MAP,
    }
    schema = closed({**general, **longctx_sections(), **kubernetes_sections()})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = "Values of the longctx chart"
    schema["allOf"] = gpu_rules()
    return schema


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render())
    print(SCHEMA_PATH)
