"""The Serve application's construction without starting Ray: the config file for `serve run` /
KubeRay, application args, and the Serve options chosen for million-token requests."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import ConfigError
from deployments.app import (
    build_app,
    config_from_args,
    ingress_options,
    llm_server_options,
)
from executors import create_executor

SERVE_CONFIG = Path(__file__).parents[2] / "deployments" / "serve_config.yaml"


def test_serve_config_is_valid_for_serve_deploy_and_kuberay():
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(document)
    # KubeRay's serveConfigV2 carries the same document; its `applications` must stand alone.
    ServeDeploySchema.model_validate({"applications": document["applications"]})
    application = document["applications"][0]
    assert application["import_path"] == "deployments.app:build_app"
    assert config_from_args(application["args"]).model.path == "/models/model"


def test_build_app_takes_a_config_mapping_a_file_and_overrides(model_dir, tmp_path):
    config_file = tmp_path / "longctx.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"path": model_dir}, "serve": {"num_replicas": 3}}))
    config = config_from_args({"config": str(config_file), "overrides": {"serve.max_queued_requests": 7}})
    assert config.serve.num_replicas == 3 and config.serve.max_queued_requests == 7
    assert build_app({"config": {"model": {"path": model_dir}}}) is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"config": {"model": {"path": "x"}}, "modle": 1}, "unknown application args"),
        ({"config": {"serve": {"num_replicas": 1}}}, "no model"),
        ({"config": {"model": {"path": "x"}, "serve": {"max_queued_tokens": 0}}}, "serve.max_queued_tokens"),
        ({"config": {"model": {"path": "x"}}, "overrides": {"serve.nope": 1}}, "serve.nope"),
    ],
)
def test_bad_application_args_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(args)


def test_serve_options_fit_long_requests(make_config):
    config = make_config(executor="ray", num_replicas=2, max_queued_requests=100, drain_timeout_s=120)
    options = llm_server_options(config)
    assert options["num_replicas"] == 2
    assert options["max_ongoing_requests"] == config.scheduler.max_num_seqs + 100
    assert options["graceful_shutdown_timeout_s"] == 120
    assert options["graceful_shutdown_wait_loop_s"] == ingress_options(config)["graceful_shutdown_wait_loop_s"] < 1
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]  # the replica, one CPU worker
    assert options["request_router_config"].request_router_class.endswith("PrefixAwareRequestRouter")
    assert ingress_options(config)["max_ongoing_requests"] >= 2 * options["max_ongoing_requests"]


def test_the_local_executor_needs_no_placement_group(make_config):
    options = llm_server_options(make_config())
    assert "placement_group_bundles" not in options
    assert options["ray_actor_options"]["num_cpus"] == 1.0 and options["ray_actor_options"]["num_gpus"] == 0


def test_local_ranks_are_reserved_by_the_replica(make_config):
    config = make_config().with_overrides({"parallel.tensor_parallel_size": 2})
    options = llm_server_options(config)
    assert "placement_group_bundles" not in options
    assert options["ray_actor_options"]["num_cpus"] == 2.0  # one local process per rank, inside the replica


def test_local_ranks_run_as_local_processes_not_as_one_rank(make_config, monkeypatch):
    import executors.local

    monkeypatch.setattr(executors.local, "LocalProcessExecutor", lambda config: ("ranks", config.parallel.world_size))
    config = make_config().with_overrides({"parallel.tensor_parallel_size": 2})
    assert create_executor(config) == ("ranks", 2)


def test_a_ray_replica_reserves_a_bundle_per_rank(make_config):
    config = make_config(executor="ray").with_overrides({"parallel.tensor_parallel_size": 2, "parallel.sequence_parallel_size": 2})
    assert llm_server_options(config)["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0}] * 4


def test_gpu_workers_get_a_gpu_bundle_each(make_config):
    config = make_config(executor="ray")
    config = config.model_copy(update={"model": config.model.model_copy(update={"device": "cuda"})})
    assert llm_server_options(config)["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]


def test_autoscaling_replaces_the_fixed_replica_count_with_the_queued_context_policy(make_config):
    config = make_config(num_replicas=2).with_overrides({"autoscaling.enabled": True, "autoscaling.max_replicas": 5})
    options = llm_server_options(config)
    assert "num_replicas" not in options
    autoscaling = options["autoscaling_config"]
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 5)
    assert autoscaling.policy.policy_function == "autoscaler.serve_policy.QueuedContextPolicy"
    # The ingress must not bound what five replicas could take.
    assert ingress_options(config)["max_ongoing_requests"] == 5 * options["max_ongoing_requests"]


def test_auto_executor_is_local_outside_a_ray_actor_and_ray_inside_one(make_config, local_ray):
    import subprocess
    import sys

    from executors import executor_backend

    code = ("from cluster.config import LongctxConfig; from executors import executor_backend; "
            "import sys; print(executor_backend(LongctxConfig()), 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["local", "False"]  # decided without importing Ray
    assert executor_backend(make_config(executor="local")) == "local"
    assert executor_backend(make_config(executor="ray")) == "ray"
    auto = make_config(executor="auto")
    assert executor_backend(auto, inside_ray_actor=True) == "local"  # one rank: in the replica's own process
    assert llm_server_options(auto)["ray_actor_options"]["num_cpus"] == auto.serve.worker_num_cpus
    tp2 = auto.with_overrides({"parallel.tensor_parallel_size": 2})
    assert executor_backend(tp2, inside_ray_actor=True) == "ray"  # what a TP replica resolves
    assert executor_backend(tp2, inside_ray_actor=False) == "local"
    assert "placement_group_bundles" in llm_server_options(tp2)  # so its driver reserves the bundles


def test_spanning_nodes_reserves_a_bundle_per_tp_group_packed_not_strict(make_config):
    from executors.placement import rank_bundle_index

    config = make_config(executor="ray").with_overrides({
        "parallel.tensor_parallel_size": 2, "parallel.sequence_parallel_size": 4, "parallel.span_nodes": True,
        "model.device": "cuda"})
    options = llm_server_options(config)
    assert options["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 2.0}] * 4
    assert options["placement_group_strategy"] == "PACK"
    assert [rank_bundle_index(config, rank) for rank in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]  # TP groups together
    one_node = config.with_overrides({"parallel.span_nodes": False})
    assert llm_server_options(one_node)["placement_group_strategy"] == "STRICT_PACK"
    assert [rank_bundle_index(one_node, rank) for rank in range(8)] == list(range(1, 9))


def test_spanning_nodes_needs_the_ray_executor(make_config):
    from cluster.config import ConfigError

    config = make_config(executor="local").with_overrides({"parallel.span_nodes": True})
    with pytest.raises(ConfigError, match="needs parallel.executor ray"):
        create_executor(config)


def test_auto_resolves_inside_an_actor_as_ray_and_in_a_ray_driver_as_local(local_ray):
    from cluster.config import LongctxConfig
    from executors import executor_backend

    @local_ray.remote(num_cpus=0)
    class Probe:
        def backend(self):
            from executors import executor_backend

            return executor_backend(tp2), executor_backend(LongctxConfig())

    tp2 = LongctxConfig().with_overrides({"parallel.tensor_parallel_size": 2})
    probe = Probe.remote()
    assert local_ray.get(probe.backend.remote()) == ("ray", "local")  # TP ranks as actors; one rank in process
    assert executor_backend(tp2) == "local"  # this test process called ray.init(): still a driver
    local_ray.kill(probe)


def test_an_accelerator_type_pins_every_gpu_worker_to_that_gpu_model(make_config):
    config = make_config(executor="ray").with_overrides({"model.device": "cuda", "serve.accelerator_type": "H200"})
    worker = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H200": 0.001}
    assert llm_server_options(config)["placement_group_bundles"] == [{"CPU": 1.0}, worker]
    local = llm_server_options(config.with_overrides({"parallel.executor": "local"}))
    assert local["ray_actor_options"]["accelerator_type"] == "H200"
