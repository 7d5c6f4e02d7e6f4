"""Fixtures shared across test folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent

# Without CUDA, Triton kernels run in Triton's interpreter. It must be chosen before anything
# imports Triton (its own library functions are defined at import), and test collection may
# import it through other packages before model_shards/attention/triton_runtime.py runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (starting Ray costs seconds; two inits would clash).

    16 logical CPUs whatever the machine has: the session's Serve app (ingress, 2 replicas and
    their worker bundles: 4.5) stays up while a 2x2 TP x SP placement group (1 + 4 bundles) and
    one more app of a deployments test (at most 3.5: the `--tp 2` app, deleted after its module)
    are placed beside it. Actors import test helpers from tests/parallel.
    """
    ray = pytest.importorskip("ray")
    python_path = os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR / "parallel")])
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world2():
    """Two spawned CPU ranks (gloo) for the whole session: spawning one costs seconds (a fresh
    interpreter importing torch), and executors built on an existing world leave it running
    (executors/local.py), so the tiers' and the parallelism tests share it."""
    from executors.rank_processes import RankProcesses

    processes = RankProcesses(2, "cpu")
    yield processes
    processes.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-matrix tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    OpenMP hand-offs cost more than they save on such matrices, 40x more on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
