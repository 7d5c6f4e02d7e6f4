"""The chart rendered by Helm's engine in the scenarios operators run, every object validated
against the schemas a real API server checks (unknown fields rejected)."""

from __future__ import annotations

import jsonschema
import pytest
from chart_helpers import SCENARIOS, by_kind, one, render, serve_config, validate


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_validates_against_its_schema(scenario):
    objects = render(SCENARIOS[scenario])
    assert one(objects, "RayService")
    for item in objects:
        validate(item)


def test_the_defaults_render_every_part():
    kinds = sorted(item["kind"] for item in render())
    assert kinds == ["ConfigMap", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor", "RayService",
                     "Secret", "Service", "ServiceMonitor", "StatefulSet"]


def test_a_field_kuberay_does_not_know_is_rejected():
    service = one(render(), "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParms"):
        validate(service)


def test_a_field_kubernetes_does_not_know_is_rejected():
    stateful_set = one(render(), "StatefulSet")
    stateful_set["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        validate(stateful_set)


def test_monitoring_off_renders_no_monitor_and_no_dashboard():
    kinds = {item["kind"] for item in render(SCENARIOS["monitoring off"])}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "ConfigMap"}


def test_external_redis_renders_no_redis_and_reads_the_given_secret():
    objects = render(SCENARIOS["external Redis over TLS"])
    assert not by_kind(objects, "StatefulSet") and not by_kind(objects, "Secret")
    tiers = serve_config(objects)["applications"][0]["args"]["config"]["kv_tiers"]
    assert tiers["redis_urls"] == ["rediss://redis.example:6380/0"]
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in worker["volumes"] if "secret" in volume}
    assert secrets == {"redis-password": "redis-auth", "redis-tls": "redis-ca"}
    assert not by_kind(objects, "NetworkPolicy")  # nothing of ours to protect


def test_redis_is_a_cache_with_a_password_from_a_secret_and_no_persistence_by_default():
    objects = render()
    redis = one(objects, "StatefulSet")["spec"]
    container = redis["template"]["spec"]["containers"][0]
    command = " ".join(container["command"])
    assert "--maxmemory 16gb --maxmemory-policy allkeys-lru" in command and "--requirepass $(REDIS_PASSWORD)" in command
    assert "--appendonly no" in command and "volumeClaimTemplates" not in redis
    secret = one(objects, "Secret")
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                "key": "redis-password"}
    assert len(secret["data"]["redis-password"]) >= 40  # 32 random characters, base64


def test_persistence_and_tls_change_redis_as_asked():
    redis = one(render(SCENARIOS["object store, autoscaling, ingress, API key"]), "StatefulSet")["spec"]
    command = " ".join(redis["template"]["spec"]["containers"][0]["command"])
    assert "--appendonly yes" in command and "--port 0 --tls-port 6379" in command
    assert redis["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "64Gi"


def test_only_the_ray_pods_reach_redis():
    objects = render()
    policy = one(objects, "NetworkPolicy")["spec"]
    redis_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert all(redis_labels[key] == value for key, value in policy["podSelector"]["matchLabels"].items())
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["ray-head", "gpu-worker"]
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert all(labels[key] == value for key, value in peer["podSelector"]["matchLabels"].items())
        assert labels["app.kubernetes.io/component"] in peer["podSelector"]["matchExpressions"][0]["values"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def test_every_pod_runs_as_non_root_without_privileges():
    objects = render(SCENARIOS["object store, autoscaling, ingress, API key"])
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"],
            one(objects, "StatefulSet")["spec"]["template"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_dashboards_are_config_maps_for_the_grafana_sidecar():
    maps = by_kind(render(), "ConfigMap")
    assert sorted(next(iter(item["data"])) for item in maps) == ["longctx-kv-tiers.json", "longctx-serving.json"]
    assert all(item["metadata"]["labels"]["grafana_dashboard"] == "1" for item in maps)


def test_the_monitors_select_what_the_chart_exposes():
    objects = render()
    service = one(objects, "RayService")["spec"]["serveService"]
    monitor = one(objects, "ServiceMonitor")["spec"]
    assert all(service["metadata"]["labels"][key] == value for key, value in monitor["selector"]["matchLabels"].items())
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_monitor = one(objects, "PodMonitor")["spec"]
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod_monitor["podMetricsEndpoints"][0]["port"] in {port["name"] for port in worker["containers"][0]["ports"]}


def test_ingress_routes_to_the_api_service():
    objects = render(SCENARIOS["object store, autoscaling, ingress, API key"])
    backend = one(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(objects, "RayService")["spec"]["serveService"]["metadata"]["name"],
                       "port": {"name": "serve"}}
