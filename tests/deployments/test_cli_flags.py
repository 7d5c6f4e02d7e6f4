"""The command line a vLLM user reaches for: serve flags into the one config, byte sizes with
units, Redis without a host size, --version, generate's sampling flags; and `serve run` on a
Ray too small for the application refused with the fix in the message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.cli import _parser, build_config
from cluster.config import DEFAULT_REDIS_STAGING_BYTES, ConfigError, LongctxConfig, ModelSettings, ParallelSettings, \
    load_config_dict
from deployments.app import application_needs, check_cluster_fits


def _config(*argv: str) -> LongctxConfig:
    return build_config(_parser().parse_args(list(argv)))


def test_serve_flags_reach_the_config(model_dir):
    config = _config("serve", "--model", model_dir, "--served-model-name", "my-model", "--api-key", "k1",
                     "--max-num-seqs", "8", "--num-replicas", "3", "--executor", "local", "--tensor-parallel-size",
                     "2", "--kv-host-bytes", "64MiB")  # fmt: skip
    assert config.serve.model_name == "my-model" and config.serve.api_key == "k1"
    assert config.scheduler.max_num_seqs == 8 and config.serve.num_replicas == 3
    assert config.parallel.executor == "local" and config.parallel.tensor_parallel_size == 2
    assert config.kv_tiers.host_bytes == 64 << 20


def test_byte_sizes_take_units_on_the_command_line_and_in_yaml(model_dir):
    assert _config("generate", "--model", model_dir, "--prompt", "x", "--kv-host-bytes", "1GiB").kv_tiers.host_bytes == 1 << 30
    assert _config("generate", "--model", model_dir, "--prompt", "x", "--kv-host-bytes", "2048").kv_tiers.host_bytes == 2048
    config = load_config_dict({"cache": {"cpu_kv_bytes": "512MB"}, "kv_tiers": {"host_bytes": "1.5 GiB"}})
    assert config.cache.cpu_kv_bytes == 512 * 10**6 and config.kv_tiers.host_bytes == 3 << 29
    with pytest.raises(ConfigError, match="host_bytes"):
        load_config_dict({"kv_tiers": {"host_bytes": "lots"}})
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "--prompt", "x", "--kv-host-bytes", "1XB"])


def test_redis_alone_stages_through_a_default_host_size_and_says_so(model_dir, capsys):
    config = _config("generate", "--model", model_dir, "--prompt", "x", "--kv-redis-url", "redis://127.0.0.1:6399")
    assert config.kv_tiers.host_bytes == DEFAULT_REDIS_STAGING_BYTES
    assert "Redis blocks stage through 1 GiB of host memory per worker" in capsys.readouterr().err
    from_yaml = load_config_dict({"kv_tiers": {"redis_urls": ["redis://h:1"]}})
    assert from_yaml.kv_tiers.host_bytes == DEFAULT_REDIS_STAGING_BYTES
    with pytest.raises(ConfigError, match="leave host_bytes out"):
        load_config_dict({"kv_tiers": {"redis_urls": ["redis://h:1"], "host_bytes": 0}})


def test_version_and_generate_sampling_flags(model_dir):
    version = subprocess.run([sys.executable, "-m", "cluster.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("longctx 0.")
    args = _parser().parse_args(["generate", "--model", model_dir, "--prompt", "x", "--top-p", "0.9", "--top-k", "5",
                                 "--stop", "a", "--stop", "bc"])  # fmt: skip
    assert (args.top_p, args.top_k, args.stop) == (0.9, 5, ["a", "bc"])


def test_an_application_larger_than_a_one_node_ray_is_refused_with_the_fix():
    config = LongctxConfig(model=ModelSettings(path="m"), parallel=ParallelSettings(executor="ray", tensor_parallel_size=2))
    assert application_needs(config) == {"CPU": 3.0}  # engine 1 + 2 ranks x 1; the one replica serves HTTP itself
    split = config.with_overrides({"serve.ingress_in_replica": False})
    assert application_needs(split) == {"CPU": 4.0}  # ingress 1 + engine 1 + 2 ranks x 1
    config = split
    with pytest.raises(ConfigError) as error:
        check_cluster_fits(config, {"CPU": 2.0}, num_nodes=1)
    assert "needs 4 CPUs (it has 2)" in str(error.value) and "longctx serve" in str(error.value)
    check_cluster_fits(config, {"CPU": 4.0}, num_nodes=1)  # fits
    check_cluster_fits(config, {"CPU": 2.0}, num_nodes=3)  # several nodes: Ray's scheduler decides
    growing = config.with_overrides({"serve.cluster_grows": True})
    check_cluster_fits(growing, {"CPU": 2.0}, num_nodes=1)
