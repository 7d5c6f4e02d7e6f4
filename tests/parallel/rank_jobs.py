"""Functions the tests run on every rank of a spawned world (engine/multiproc_executor.py's
RankProcesses): module-level, so that they pickle by name. Each returns this rank's share; the
tests reassemble it and compare it with one rank computed in the test process."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from model_shards.llama import LlamaForCausalLM
from model_shards.parallel.groups import ParallelGroup, ParallelLayout, build_layout
from model_shards.parallel.lse_attention import reference_attention
from model_shards.parallel.ring import ring_attention
from model_shards.parallel.sp_attention import (
    LocalBatch,
    SequenceParallelBackend,
    build_local_batch,
)
from model_shards.parallel.sp_plan import SequenceParallelPlan, StepSequence
from model_shards.parallel.ulysses import SequenceShards, ulysses_attention
from model_shards.rank import RankContext

# name -> (block table, all its tokens, tokens already cached when it starts: a prefix-cache hit
# on blocks another sequence wrote)
Sequences = dict[str, tuple[list[int], list[int], int]]
Schedule = list[dict[str, int]]  # per step: name -> tokens to compute


def layout_for(context: RankContext, tp: int, sp: int) -> ParallelLayout:
    """This rank's groups for tp x sp, created once per world (new_group is collective)."""
    if tp * sp == 1:
        return ParallelLayout.single()
    key = ("layout", tp, sp)
    if key not in context.state:
        context.state[key] = build_layout(tp, sp, context.device)
    return context.state[key]


def run_model_steps(context: RankContext, folder: Path, tp: int, sp: int, block_size: int, num_blocks: int,
                    sequences: Sequences, schedule: Schedule) -> list[dict[str, tuple[list[int], torch.Tensor]]]:
    """Drive the model through `schedule`; per step and sequence, (positions, logits) of the rows
    this rank computed (TP rank 0 only: the other TP ranks hold the same logits)."""
    layout = layout_for(context, tp, sp)
    backend = SequenceParallelBackend(layout.sp) if sp > 1 else "torch_sdpa"
    model = LlamaForCausalLM.from_folder(folder, dtype=torch.float32, attention_backend=backend, tp=layout.tp)
    cache = model.allocate_kv_cache(num_blocks, block_size // sp)
    computed = {name: start for name, (_, _, start) in sequences.items()}
    results = []
    for step in schedule:
        names = list(step)
        steps = [StepSequence(sequences[n][0], computed[n], step[n]) for n in names]
        batch = build_local_batch(steps, [sequences[n][1] for n in names], block_size, layout.sp, "cpu")
        logits = model.compute_logits(model(batch.input_ids, batch.metadata.positions, batch.metadata, cache))
        results.append(_by_sequence(names, batch, logits) if layout.tp.rank == 0 else {})
        for name in names:
            computed[name] += step[name]
    return results


def _by_sequence(names: list[str], batch: LocalBatch,
                 logits: torch.Tensor) -> dict[str, tuple[list[int], torch.Tensor]]:
    starts, positions = batch.metadata.query_start_loc, batch.metadata.positions.tolist()
    return {names[index]: (positions[starts[j]:starts[j + 1]], logits[starts[j]:starts[j + 1]])
            for j, index in enumerate(batch.order)}


def ring_group(context: RankContext, size: int) -> ParallelGroup | None:
    """A group of world ranks 0 .. size-1 (None on the others), created once per world."""
    key = ("ring", size)
    if key not in context.state:
        ranks = list(range(size))
        process_group = dist.new_group(ranks) if context.world_size > 1 else None
        member = context.rank < size
        context.state[key] = ParallelGroup(context.rank, size, tuple(ranks), process_group) if member else None
    return context.state[key]


def run_ring(context: RankContext, size: int, queries: list[torch.Tensor], keys: list[torch.Tensor],
             values: list[torch.Tensor]) -> tuple[list[tuple[int, int]], torch.Tensor, list[int]] | None:
    """Ring attention over fresh chunks (no cache) of several sequences, on `size` ranks:
    ((sequence, position) of this rank's rows, their outputs, positions this rank stored), or
    None off the ring."""
    group = ring_group(context, size)
    if group is None:
        return None
    steps = [StepSequence(list(range(len(q))), 0, len(q)) for q in queries]  # tables: only slot arithmetic
    plan = SequenceParallelPlan.build(steps, block_size=size, rank=group.rank, size=size)
    rows = [(i, p) for local, i in enumerate(plan.order) for a, b in plan.pieces[local] for p in range(a, b)]
    q, k, v = (torch.stack([t[i][p] for i, p in rows]) for t in (queries, keys, values))
    stored: list[int] = []

    def store(src: int, block: torch.Tensor) -> None:
        src_rows, _ = plan.ring_writes(src)
        src_plan = SequenceParallelPlan.build(steps, size, src, size)
        stored.extend(src_plan.positions()[src_rows].tolist())

    partial = ring_attention(q, k, v, plan, group, q.shape[-1] ** -0.5, reference_attention, on_block=store)
    return rows, partial.out, stored


def fail_on(context: RankContext, rank: int, others_delay_s: float = 0.0, tag: str = "") -> str:
    """Rank `rank` raises at once; the others answer f"{tag}{rank}" after `others_delay_s`."""
    if context.rank == rank:
        raise ValueError(f"planted failure on rank {rank}")
    time.sleep(others_delay_s)
    return f"{tag}{context.rank}"


def run_ulysses(context: RankContext, size: int, layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fed_layout: str | None = None) -> tuple[list[int], torch.Tensor] | None:
    """Ulysses attention of one prompt on `size` ranks whose rows are split as `layout`
    ("contiguous" or "zigzag"): (positions of this rank's rows, their outputs), or None off the
    group. `fed_layout`: feed the rows of another layout than the one declared (a planted bug)."""
    group = ring_group(context, size)
    if group is None:
        return None
    shards = getattr(SequenceShards, layout)(len(q), size)
    rows = getattr(SequenceShards, fed_layout or layout)(len(q), size).positions_of(group.rank)
    out = ulysses_attention(q[rows], k[rows], v[rows], shards, group, q.shape[-1] ** -0.5, reference_attention)
    return rows, out


def ulysses_error(context: RankContext, size: int, heads: int, kv_heads: int) -> str | None:
    """The ValueError message of Ulysses over `heads` / `kv_heads` on `size` ranks (None: no error).
    Raised before any communication, on every rank alike."""
    group = ring_group(context, size)
    if group is None:
        return None
    q, k = torch.zeros(8, heads, 4), torch.zeros(8, kv_heads, 4)
    shards = SequenceShards.contiguous(8 * size, size)
    try:
        ulysses_attention(q, k, k, shards, group, 0.5, reference_attention)
    except ValueError as error:
        return str(error)
    return None
