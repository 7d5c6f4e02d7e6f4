"""Process groups as plain objects that the model is given: no module-level distributed state.

A `ParallelGroup` is a set of ranks that run collectives together (a torch.distributed group)
or a single rank alone, for which every collective is the identity. A `ParallelLayout` holds the
three groups one rank belongs to. World ranks are laid out TP-innermost:

    world rank = sp_rank * tp_size + tp_rank

so that the ranks of one TP group (two all-reduces per layer, the heaviest traffic) are neighbours,
which on one node means NVLink peers; the SP ring (one KV block per ring step) runs across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, eq=False)
class ParallelGroup:
    rank: int = 0  # this rank's index within the group
    size: int = 1
    ranks: tuple[int, ...] = (0,)  # world rank of each member, in group order
    process_group: dist.ProcessGroup | None = None  # None when size == 1
    device: torch.device = torch.device("cpu")  # where its collectives' tensors live (NCCL: cuda)

    @classmethod
    def single(cls, world_rank: int = 0) -> ParallelGroup:
        return cls(0, 1, (world_rank,), None)

    def world_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank % self.size]

    def split(self, total: int, what: str) -> int:
        """total / size, or an error naming `what` when it does not divide."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by parallel size {self.size}")
        return total // self.size

    def head_shard(self, num_heads: int, what: str) -> tuple[int, int]:
        """(shard index, shard count) of the heads this rank holds. With fewer heads than ranks
        each head is replicated on size / num_heads consecutive ranks (Llama 3 70B: 8 KV heads
        over TP 16 puts each KV head on 2 ranks)."""
        if num_heads >= self.size:
            self.split(num_heads, what)
            return self.rank, self.size
        if self.size % num_heads:
            raise ValueError(f"{what}={num_heads} neither divides nor is a multiple of parallel size {self.size}")
        replicas = self.size // num_heads
        return self.rank // replicas, num_heads

    # --- collectives (identity on one rank) -------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns the tensor."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Equal-shaped tensors of every rank, concatenated along dim in rank order."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)

    def all_gather_stacked(self, tensor: torch.Tensor) -> torch.Tensor:
        """(size, *tensor.shape): every rank's equal-shaped tensor, in rank order."""
        if self.size == 1:
            return tensor.unsqueeze(0)
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=self.process_group)  # into views of out
        return out

    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> None:
        """send[j] goes to rank j, recv[j] comes from rank j; shapes may differ per peer. Grouped
        point-to-point (gloo's all_to_all wants equal shapes); empty tensors are not sent."""
        recv[self.rank].copy_(send[self.rank])
        ops = []
        for peer in range(self.size):
            if peer == self.rank:
                continue
            if send[peer].numel():
                ops.append(dist.P2POp(dist.isend, send[peer].contiguous(), self.world_rank(peer), self.process_group))
            if recv[peer].numel():
                ops.append(dist.P2POp(dist.irecv, recv[peer], self.world_rank(peer), self.process_group))
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank `src`'s tensor on every rank, in place."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.world_rank(src), group=self.process_group)
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.process_group)
        return int(tensor.item())

    def all_gather_object(self, value: object) -> list[object]:
        """Every rank's picklable value, in rank order. A host round trip: for control data
        outside the forward pass only (the KV tiers' outcomes), never per layer."""
        if self.size == 1:
            return [value]
        gathered: list[object] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.process_group)
        return gathered

    def broadcast_ints(self, values: list[int] | None, count: int) -> list[int]:
        """Rank 0's `count` ints on every rank (the others pass None)."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values if self.rank == 0 else [0] * count, dtype=torch.long, device=self.device)
        return self.broadcast(tensor).tolist()

    def start_ring_exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> list:
        """Send to the next rank and receive from the previous one, asynchronously; returns the
        requests to wait on. Grouped (batch_isend_irecv), so that NCCL never deadlocks on a
        send waiting for a receive posted later. None: nothing to send (or receive)."""
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.world_rank(self.rank + 1), self.process_group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.world_rank(self.rank - 1), self.process_group))
        return dist.batch_isend_irecv(ops) if ops and self.size > 1 else []


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """The groups of one rank: tensor parallel (heads), sequence parallel (tokens), and all."""

    tp: ParallelGroup
    sp: ParallelGroup
    world: ParallelGroup

    @classmethod
    def single(cls) -> ParallelLayout:
        one = ParallelGroup.single()
        return cls(one, one, one)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_driver_rank(self) -> bool:
        """World rank 0 samples and returns the step's output."""
        return self.world.rank == 0

    def describe(self) -> str:
        return f"tp_rank={self.tp.rank}/{self.tp.size}|sp_rank={self.sp.rank}/{self.sp.size}"


def build_layout(tp_size: int, sp_size: int, device: torch.device | str = "cpu") -> ParallelLayout:
    """The layout of this rank, after `torch.distributed.init_process_group` (world = tp * sp).
    `device`: where this rank's collective tensors live (its GPU under NCCL).

    Every rank creates every group, in the same order: `new_group` is collective over the world.
    """
    world_size, world_rank, device = dist.get_world_size(), dist.get_rank(), torch.device(device)
    if world_size != tp_size * sp_size:
        raise ValueError(f"world size {world_size} != tp {tp_size} x sp {sp_size}")
    sp_rank, tp_rank = divmod(world_rank, tp_size)
    tp_ranks = [tuple(s * tp_size + t for t in range(tp_size)) for s in range(sp_size)]
    sp_ranks = [tuple(s * tp_size + t for s in range(sp_size)) for t in range(tp_size)]
    tp = _group_of(tp_ranks, world_rank, tp_rank, device)
    sp = _group_of(sp_ranks, world_rank, sp_rank, device, high_priority=True)
    world = ParallelGroup(world_rank, world_size, tuple(range(world_size)),
                          dist.group.WORLD if world_size > 1 else None, device)
    return ParallelLayout(tp, sp, world)


def _group_of(all_ranks: list[tuple[int, ...]], world_rank: int, rank_in_group: int,
              device: torch.device, high_priority: bool = False) -> ParallelGroup:
    """Create each group of a partition (collectively) and return the one holding this rank."""
    mine = ParallelGroup(0, 1, (world_rank,), None, device)
    for ranks in all_ranks:
        if len(ranks) == 1:
            continue  # a group of one needs no process group, and gloo would build one anyway
        process_group = new_process_group(ranks, high_priority)
        if world_rank in ranks:
            mine = ParallelGroup(rank_in_group, len(ranks), ranks, process_group, device)
    return mine


def new_process_group(ranks: tuple[int, ...], high_priority: bool = False) -> dist.ProcessGroup:
    """A process group (collective over the world). `high_priority` (NCCL only): its kernels run
    on a high-priority stream. The SP group's ring exchange is posted beside a multi-second
    attention kernel; on a normal stream its NCCL kernel can wait for SMs behind that kernel's
    blocks, holding back the peer (Megatron-LM gives context-parallel groups such streams too)."""
    if high_priority and dist.get_backend() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
        return dist.new_group(list(ranks), pg_options=options)
    return dist.new_group(list(ranks))
