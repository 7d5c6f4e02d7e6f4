"""values.schema.json, checked by Helm itself: it is the generated one, the defaults pass, and it
rejects negative sizes, unknown keys and GPU counts that do not give TP x SP; lint passes."""

from __future__ import annotations

import importlib.util
import itertools

import helm_python
import pytest
import yaml
from chart_helpers import CHART, ROOT, chart, notes

from cluster.config import AutoscalingSettings


def _schema_module():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "helm" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_schema_is_the_generated_one():
    # after a change to helm/values_schema.py: python helm/values_schema.py
    assert (CHART / "values.schema.json").read_text() == _schema_module().render()


def test_lint_passes_with_no_error():
    report = helm_python.lint(str(CHART))
    assert report["errors"] == [] and all(message["severity"] <= 1 for message in report["messages"])


def test_the_defaults_pass():
    chart().validate_schema({})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kvTiers": {"hostBytes": -1}}, "/kvTiers/hostBytes"),
        ({"serve": {"numReplicas": 0}}, "/serve/numReplicas"),
        ({"cache": {"blockSize": -64}}, "/cache/blockSize"),
        ({"serve": {"requestTimeoutS": -5}}, "/serve/requestTimeoutS"),
        ({"workers": {"memory": "-64Gi"}}, "/workers/memory"),
        ({"redis": {"persistence": {"size": "-1Gi"}}}, "/redis/persistence/size"),
        ({"workers": {"gpusPerPod": 3}}, "/workers/gpusPerPod"),
        ({"parallel": {"tensorParallelSize": 3}}, "/parallel/tensorParallelSize"),
        ({"workers": {"gpuz": 1}}, "gpuz"),
        ({"redis": {"mode": "cluster"}}, "/redis/mode"),
        ({"redis": {"urls": ["http://redis:6379"]}}, "/redis/urls/0"),
        ({"serve": {"autoscaling": {"policy": "not a path"}}}, "/serve/autoscaling/policy"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(values, message):
    with pytest.raises(helm_python.HelmValuesError, match=message):
        chart().validate_schema(values)


@pytest.mark.parametrize("policy", ["queued-context", "QueuedContextPolicy", ""])
def test_an_unknown_autoscaling_policy_is_refused_naming_the_choices(policy):
    # the names, then the import-path form (module:function)
    message = "(?s)'/serve/autoscaling/policy'.*must be one of 'queuedContext', 'ongoingRequests'.*does not match pattern"
    with pytest.raises(helm_python.HelmValuesError, match=message):
        chart().validate_schema({"serve": {"autoscaling": {"enabled": True, "policy": policy}}})


def test_the_autoscaling_defaults_are_the_configs():
    """values.yaml must repeat cluster/config.py's defaults (Helm reads no Python); the schema
    generator takes them from the config, this holds values.yaml to them."""
    module = _schema_module()
    scaling = yaml.safe_load((CHART / "values.yaml").read_text())["serve"]["autoscaling"]
    defaults = AutoscalingSettings()
    assert scaling["policy"] == "queuedContext"
    for key, name in module.AUTOSCALING_BOUNDS.items():
        assert scaling[key] == getattr(defaults, name), key
    for key, name in module.QUEUED_CONTEXT_KNOBS.items():
        assert scaling["queuedContext"][key] == getattr(defaults, name), key


def test_gpu_counts_must_give_tp_times_sp():
    """Every combination of the allowed sizes: accepted exactly when gpusPerPod x nodesPerReplica =
    TP x SP and, over several pods, each pod holds whole TP groups."""
    module = _schema_module()
    import jsonschema

    validator = jsonschema.Draft7Validator(module.values_schema())
    for tensor, sequence, gpus, nodes in itertools.product(module.PARALLEL_SIZES, module.PARALLEL_SIZES,
                                                           module.GPUS_PER_POD, module.NODES_PER_REPLICA):
        values = {"parallel": {"tensorParallelSize": tensor, "sequenceParallelSize": sequence},
                  "workers": {"gpusPerPod": gpus, "nodesPerReplica": nodes}}
        fits = gpus * nodes == tensor * sequence and (nodes == 1 or gpus % tensor == 0)
        assert validator.is_valid(values) == fits, values


def test_helm_rejects_tp_8_on_one_gpu_pods_and_tp_across_pods():
    with pytest.raises(helm_python.HelmValuesError, match="/workers"):
        chart().validate_schema({"parallel": {"tensorParallelSize": 8}})
    chart().validate_schema({"parallel": {"tensorParallelSize": 8}, "workers": {"gpusPerPod": 8}})
    with pytest.raises(helm_python.HelmValuesError, match="gpusPerPod"):  # TP all-reduces must stay on NVLink
        chart().validate_schema({"parallel": {"tensorParallelSize": 8}, "workers": {"gpusPerPod": 4, "nodesPerReplica": 2}})


def test_install_fails_early_without_a_model_location():
    with pytest.raises(helm_python.HelmError, match="model.objectStore.uri is required"):
        chart().render({"model": {"source": "objectStore"}}, name="demo", namespace="ml")


def test_notes_name_the_first_request():
    text = notes({"serve": {"apiKey": {"existingSecret": "k"}}})
    assert "kubectl -n ml port-forward svc/demo-longctx 8000:8000" in text
    assert "Authorization: Bearer" in text and "8589934592 bytes" in text
