"""Executors run each engine step on the model workers. One interface, two backends, one factory.

The driver (engine, scheduler, KV coordinator: no torch) hands an executor a `StepInput` and gets
rank 0's `StepOutput` back. Where the ranks live is `parallel.executor`, read only by
`create_executor`:

  local   one rank: in this very process; TP x SP ranks: one spawned local process each
          (executors/local.py). A Serve replica reserves its ranks' CPUs and GPUs itself.
  ray     one Ray actor per rank, in bundles 1.. of the caller's placement group
          (executors/ray_actors.py; the bundles are laid out in executors/placement.py).

`auto` (the default) is `ray` for TP x SP ranks inside a Ray actor (a Serve replica), and
`local` otherwise: one rank in a Serve replica (a step's trip to a worker actor cost 0.7 ms a
token on the H200 through a compiled graph, ~4 ms on a loaded CPU node through plain actor
calls: docs/benchmarks.md, session 5), `longctx generate`, an engine built in a script or a test,
even one connected to Ray.

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


def executor_backend(config: LongctxConfig, inside_ray_actor: bool | None = None) -> str:
    """The backend `parallel.executor` names, `auto` resolved for a process that is a Ray actor
    (a Serve replica) or not; by default, for this process. A driver deciding a replica's
    placement passes `inside_ray_actor=True`: the replica will be one. One rank is always local."""
    if config.parallel.executor != "auto":
        return config.parallel.executor
    if config.parallel.world_size == 1 and not config.parallel.span_nodes:
        return "local"
    if inside_ray_actor is None:
        inside_ray_actor = _inside_ray_actor()
    return "ray" if inside_ray_actor else "local"


def _inside_ray_actor() -> bool:
    """Ray is never imported for this: a process that has not imported it is no Ray actor. A
    driver that merely called ray.init() (a script, a test session) keeps local ranks."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def create_executor(config: LongctxConfig) -> Executor:
    return BACKENDS[executor_backend(config)](config)


__all__ = ["BACKENDS", "Executor", "RankFailure", "create_executor", "executor_backend"]
