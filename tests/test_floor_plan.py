"""The floor plan, kept: which package may import which (docs/architecture.md draws it).

Packages are split by the process they run in. The driver (engine/, kvcache/, executors/) and
the workers (model_shards/) each import only themselves and what both share: `protocol/` (the
messages), `model_folder/` (reading a Hugging Face folder) and `cluster.config` (the one config).
Every import is read from the source (lazy ones inside functions too), so a rule cannot be
dodged by moving an import into a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "model_folder", "kvcache", "engine", "executors", "model_shards", "deployments",
            "autoscaler", "dashboards", "cluster")
SHARED = {"protocol", "model_folder", "cluster.config"}

# package -> the project modules it may import (a name covers its submodules)
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "model_folder": {"model_folder"},
    "kvcache": {"kvcache"} | SHARED,
    "executors": {"executors", "model_shards.rank"} | SHARED,
    "engine": {"engine", "kvcache", "executors"} | SHARED,
    "model_shards": {"model_shards"} | SHARED,
    "autoscaler": {"autoscaler", "engine.outputs"} | SHARED,
    "dashboards": {"dashboards"} | SHARED,
    "deployments": {"deployments", "engine", "kvcache", "executors", "autoscaler"} | SHARED,
}
# The control plane and everything the driver process runs: no tensors.
TORCH_FREE = ("protocol", "model_folder", "kvcache", "engine", "executors", "autoscaler", "deployments", "dashboards")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _covered(name: str, allowed: set[str]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in allowed)


def _violations(package: str) -> list[str]:
    found = []
    for path in _modules(package):
        for name in sorted(_imported(path)):
            if _project(name) and not _covered(name, ALLOWED[package]):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_process_may(package):
    assert _violations(package) == []


def test_the_config_is_a_leaf_every_package_may_read():
    imported = {name for name in _imported(ROOT / "cluster" / "config.py") if _project(name)}
    assert all(_covered(name, {"protocol"}) for name in imported), imported


@pytest.mark.parametrize("package", TORCH_FREE)
def test_the_driver_side_never_imports_torch(package):
    offenders = [str(path.relative_to(ROOT)) for path in _modules(package)
                 if any(name.split(".")[0] in ("torch", "triton") for name in _imported(path))]
    assert offenders == []


def test_only_the_cli_deploys():
    """deployments/ (Ray Serve) is the top of the house: only cluster/ builds on it."""
    for package in ALLOWED:
        if package != "deployments":
            assert not any(_covered(rule, {"deployments"}) for rule in ALLOWED[package]), package


def test_rules_see_a_forbidden_import(tmp_path):
    """The checker itself: a lazy upward import inside a function is found."""
    module = tmp_path / "worker.py"
    module.write_text("def f():\n    from engine.scheduler import Scheduler\n    import torch\n")
    assert {"engine.scheduler", "torch"} <= _imported(module)
    assert not _covered("engine.scheduler", ALLOWED["model_shards"])


def test_a_driver_process_runs_without_torch():
    """Importing the whole driver (engine, coordinator, executors' factory, the Serve app) loads
    no torch: the worker-side modules it names are imported only where a rank runs."""
    code = ("import sys; import engine.llm_engine, engine.async_engine, kvcache.coordinator, executors, "
            "executors.local, deployments.llm_server; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_docs_configuration_md_is_generated_from_the_config():
    """Run `make docs` after changing cluster/config.py."""
    from cluster.config_docs import render_configuration_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == render_configuration_markdown()


def test_every_config_key_says_what_it_means():
    from cluster.config import LongctxConfig

    undocumented = [f"{section}.{key}" for section, field in LongctxConfig.model_fields.items()
                    for key, sub in field.annotation.model_fields.items() if not sub.description]
    assert undocumented == []
