"""One rank's life on the worker side, whichever executor hosts it (local process or Ray actor).

The executors (executors/) start ranks and ship calls to them; what runs on a rank is here:
join the torch.distributed world, build the rank's process groups and `ModelWorker`, run steps.
Torch is imported inside the functions, so that a driver can name them (to pickle them for a
rank) without importing torch itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cluster.config import LongctxConfig
from protocol.step import StepInput, StepOutput
from protocol.worker_description import WorkerDescription


@dataclass
class RankContext:
    """What a function called on a rank is given: who it is, and state kept between calls."""

    rank: int
    world_size: int
    device: Any  # torch.device of this rank
    state: dict[str, Any] = field(default_factory=dict)


def join_world(rank: int, world_size: int, device: Any, store: Any) -> RankContext:
    """Join the process group through a rendezvous `store` (rank 0 opened it on a free port):
    NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # CPU ranks share the node's cores; each taking all of them oversubscribes the CPU (and
        # idle OpenMP threads spin) so that collectives wait on descheduled peers.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, device_id=device if device.type == "cuda" else None)
    return RankContext(rank, world_size, device)


def open_store(host: str, world_size: int) -> Any:
    """Rank 0's rendezvous store on port 0: the OS picks a free port, held from then on, so two
    replicas on one node never race for one."""
    import torch.distributed as dist

    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False)


def connect_store(host: str, port: int, world_size: int) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(host, port, world_size, is_master=False)


def rank_device(name: str, rank: int) -> Any:
    """auto: a GPU per rank if there are GPUs; "cuda" / "cuda:K": GPU (K +) rank; "cpu": the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def leave_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def single_rank_context(device: Any = None) -> RankContext:
    """A world of one: no process group to join."""
    return RankContext(0, 1, device)


def start_worker(context: RankContext, config: LongctxConfig) -> WorkerDescription:
    """On each rank: build its process groups (none for a world of one) and its ModelWorker."""
    from model_folder.hf_config import load_architecture
    from model_shards.deepseek_v4.worker import DeepseekV4Worker
    from model_shards.parallel.groups import ParallelLayout, build_layout
    from model_shards.worker import ModelWorker

    parallel = config.parallel
    if context.world_size == 1:
        layout = ParallelLayout.single()
    else:
        layout = build_layout(parallel.tensor_parallel_size, parallel.sequence_parallel_size, context.device)
    hybrid = load_architecture(config.model.path).architecture == "deepseek_v4"
    worker_class = DeepseekV4Worker if hybrid else ModelWorker
    worker = context.state["worker"] = worker_class(config, layout, context.device)
    return worker.description


def execute_step(context: RankContext, step_input: StepInput) -> StepOutput | None:
    """The step on one rank; only rank 0's output travels back (the others return None)."""
    output = context.state["worker"].execute(step_input)
    return output if context.rank == 0 else None


def stop_worker(context: RankContext) -> None:
    worker = context.state.pop("worker", None)
    if worker is not None:
        worker.close()
