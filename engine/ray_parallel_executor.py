"""Tensor x sequence parallel ranks as Ray actors in the caller's placement group.

Rank r runs in bundle WORKER_BUNDLE_OFFSET + r of the Serve replica's group (engine/
ray_executor.py decides that layout; deployments/app.py packs the group onto one node, so the
ranks' NCCL traffic stays on NVLink). The actors join one torch.distributed world:

1. rank 0 opens a TCPStore on port 0 of its node (`ray.util.get_node_ip_address()`; the OS
   picks a free port and rank 0 holds it, so replicas sharing a node never collide);
2. every actor joins the process group through that store (NCCL on GPUs, gloo on CPUs);
3. every actor builds its ModelWorker (the same functions as the local multiprocess executor).

Each step the StepInput is put in the object store once and every rank gets the reference; rank
0 returns the StepOutput. Ranks are awaited together, so a rank that fails raises here at once
instead of leaving rank 0 blocked in a collective with no one to answer.
"""

from __future__ import annotations

from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import LongctxConfig
from engine.executor import DescribedExecutor
from engine.multiproc_executor import RankContext, WorkerDescription, execute_step, start_worker
from engine.ray_executor import WORKER_BUNDLE_OFFSET, uses_gpu
from engine.step import StepInput, StepOutput


class RankActor:
    """One rank: a RankContext plus `call(fn, *args)`, as a local rank process has."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.context: RankContext | None = None

    def open_store(self) -> tuple[str, int]:
        """Rank 0 only: the rendezvous store, on a free port of this node."""
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False)
        return host, self._store.port

    def join(self, host: str, port: int, use_gpu: bool) -> None:
        import torch
        import torch.distributed as dist

        store = self._store if self.rank == 0 else dist.TCPStore(host, port, self.world_size, is_master=False)
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray shows each actor its GPU
        if use_gpu:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_gpu else "gloo", store=store, rank=self.rank,
                                world_size=self.world_size, device_id=device if use_gpu else None)
        self.context = RankContext(self.rank, self.world_size, device)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.context, *args)


def execute_on_rank(context: RankContext, step_input: StepInput) -> StepOutput | None:
    """The step on one rank; only rank 0's output travels back."""
    output = execute_step(context, step_input)
    return output if context.rank == 0 else None


class RayParallelExecutor(DescribedExecutor):
    def __init__(self, config: LongctxConfig):
        world_size, use_gpu = config.parallel.world_size, uses_gpu(config)
        self._actors = [_start_actor(config, rank, world_size, use_gpu) for rank in range(world_size)]
        try:
            host, port = ray.get(self._actors[0].open_store.remote())
            ray.get([actor.join.remote(host, port, use_gpu) for actor in self._actors])
            # Blocks until every rank's weights and KV cache are loaded: a replica is ready only then.
            self.description: WorkerDescription = self._call_all(start_worker, config)[0]
        except BaseException:
            self.shutdown()
            raise

    def execute(self, step_input: StepInput) -> StepOutput:
        return self._call_all(execute_on_rank, ray.put(step_input))[0]

    def _call_all(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn on every rank; results in rank order. Raises as soon as any rank fails."""
        refs = [actor.call.remote(fn, *args) for actor in self._actors]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])  # a failed rank raises here, before the others are awaited
        return ray.get(refs)

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def _start_actor(config: LongctxConfig, rank: int, world_size: int, use_gpu: bool) -> Any:
    options: dict[str, Any] = {"num_cpus": config.serve.worker_num_cpus, "num_gpus": 1 if use_gpu else 0}
    group = ray.util.get_current_placement_group()
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=WORKER_BUNDLE_OFFSET + rank
        )
    # As in ray_executor.py: a rank that dies takes its KV shard with it; no restart under a live
    # engine, the replica fails its health check and Serve replaces it whole.
    return ray.remote(RankActor).options(max_restarts=0, **options).remote(rank, world_size)
