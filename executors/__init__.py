"""Executors run each engine step on the model workers. One interface, two backends, one factory.

The driver (engine, scheduler, KV coordinator: no torch) hands an executor a `StepInput` and gets
rank 0's `StepOutput` back. Where the ranks live is `parallel.executor`, read only by
`create_executor`:

  local   one rank: in this very process; TP x SP ranks: one spawned local process each
          (executors/local.py). A Serve replica reserves its ranks' CPUs and GPUs itself.
  ray     one Ray actor per rank, in bundles 1.. of the caller's placement group
          (executors/ray_actors.py; the bundles are laid out in executors/placement.py).

`auto` (the default) is `ray` in a process connected to Ray (a Serve replica, the driver that
deploys it) and `local` otherwise (`longctx generate`, an engine built in a script).

What runs on a rank (join the world, build the worker, run a step) is worker-side code in
`model_shards/rank.py`; both backends call the same functions. Backends import torch and Ray
only where they run, so this package stays importable in a torch-free driver.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from cluster.config import LongctxConfig
from executors.base import Executor, RankFailure


def _local(config: LongctxConfig) -> Executor:
    from executors.local import create_local_executor

    return create_local_executor(config)


def _ray(config: LongctxConfig) -> Executor:
    from executors.ray_actors import RayActorExecutor

    return RayActorExecutor(config)


BACKENDS: dict[str, Callable[[LongctxConfig], Executor]] = {"local": _local, "ray": _ray}


def executor_backend(config: LongctxConfig) -> str:
    """The backend `parallel.executor` names, `auto` resolved. Ray is never imported for this:
    a process that has not imported it cannot be connected to it."""
    if config.parallel.executor != "auto":
        return config.parallel.executor
    ray = sys.modules.get("ray")
    return "ray" if ray is not None and ray.is_initialized() else "local"


def create_executor(config: LongctxConfig) -> Executor:
    return BACKENDS[executor_backend(config)](config)


__all__ = ["BACKENDS", "Executor", "RankFailure", "create_executor", "executor_backend"]
