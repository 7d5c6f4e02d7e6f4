"""Sequence-parallel attention: the attention backend each SP rank runs (split rules: sp_plan.py).

Per layer, on rank r of N, over this rank's local rows (ring rows first, then decode rows):

1. Prefill chunks: ring attention over the chunk's K/V (ring.py); each K/V block passing by has
   the positions r owns written into r's stripe of the paged cache.
2. Their cached context (chunked prefill, prefix-cache hits), striped over all ranks: every rank
   sends its chunk queries to every rank (all-to-all), each attends them over its own stripe,
   the (out, lse) partials come back (all-to-all) and are merged. Queries travel, not the
   cached KV: a chunk of n tokens over a context of c moves n query rows instead of c KV rows.
3. Decode tokens (replicated on all ranks): the owner writes the new K/V, every rank attends
   over its own stripe, and the partials merge in one all-gather of (rows, H, D + 1) floats.

All three are exact (log-sum-exp merges); rows sampled afterwards live on SP rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_shards.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    padded_block_tables,
    write_kv,
)
from model_shards.device import host_to_device, upload_packed
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.lse_attention import (
    DECODE_PREFERENCE,
    KERNELS,
    PREFILL_PREFERENCE,
    LseKernel,
    PartialSum,
    attention_with_lse,
    merge_outputs,
    merge_stacked,
    select_kernel,
)
from model_shards.parallel.ring import ring_attention
from model_shards.parallel.sp_plan import (
    SequenceParallelPlan,
    StepSequence,
    arange_of_ranges,
    local_count,
)


@dataclass
class SequenceParallelMetadata(AttentionMetadata):
    """AttentionMetadata of this rank's local rows (local order), plus the step's plan and its
    index tensors, moved to the device once per step rather than once per layer.

    `context_lens` stay global (RoPE reads them); `slot_mapping` is unused (the plan says where
    each position is stored)."""

    plan: SequenceParallelPlan
    ring_writes: list[tuple[torch.Tensor, torch.Tensor]]  # per src rank: (block rows, local slots)
    decode_writes: tuple[torch.Tensor, torch.Tensor]  # (decode rows this rank owns, local slots)
    cached_queries: torch.Tensor  # ring rows whose queries visit the other ranks' cache stripes

    @classmethod
    def build_for(cls, sequences: list[StepSequence], block_size: int, rank: int, size: int,
                  device: torch.device | str) -> SequenceParallelMetadata:
        """From the step's sequences (batch order) and this rank's place in the SP group."""
        plan = SequenceParallelPlan.build(sequences, block_size, rank, size)
        local = [sequences[i] for i in plan.order]
        ring_writes = [plan.ring_writes(src) for src in range(size)]
        positions, table, decode_rows, decode_slots, cached_queries, *ring_flat = upload_packed(
            [plan.positions(), padded_block_tables([seq.block_table for seq in local]), *plan.decode_writes(),
             arange_of_ranges([ring.rows for ring in plan.cached_ring()]), *(t for pair in ring_writes for t in pair)],
            device)
        return cls(
            query_start_loc=plan.query_start_loc(),
            context_lens=[seq.computed + seq.num_new for seq in local],
            slot_mapping=torch.empty(0, dtype=torch.long, device=device),
            positions=positions,
            block_table_tensor=table,
            block_size=block_size,
            plan=plan,
            ring_writes=list(zip(ring_flat[0::2], ring_flat[1::2])),
            decode_writes=(decode_rows, decode_slots),
            cached_queries=cached_queries,
        )


@dataclass
class LocalBatch:
    """One rank's rows of a step. Local sequence j (batch index order[j]) owns rows
    metadata.query_start_loc[j] .. [j + 1]; its last row is its last token on SP rank 0."""

    input_ids: torch.Tensor  # (rows,)
    metadata: AttentionMetadata
    order: list[int]  # batch index of each local sequence

    def last_row(self, local_index: int) -> int:
        return self.metadata.query_start_loc[local_index + 1] - 1


def build_local_batch(sequences: list[StepSequence], token_ids: list[Sequence[int]], block_size: int,
                      sp: ParallelGroup, device: torch.device | str,
                      sequence_parallel: bool | None = None) -> LocalBatch:
    """This SP rank's input ids and metadata; `token_ids[i]`: sequence i's tokens by position.
    `sequence_parallel`: SequenceParallelMetadata (what SequenceParallelBackend reads; True also
    on one rank) or plain AttentionMetadata; by default the former exactly when sp.size > 1."""
    if not (sp.size > 1 if sequence_parallel is None else sequence_parallel):
        metadata = AttentionMetadata.build([(s.block_table, s.computed, s.num_new) for s in sequences], block_size,
                                           device)
        order, pieces = list(range(len(sequences))), [[(s.computed, s.computed + s.num_new)] for s in sequences]
    else:
        metadata = SequenceParallelMetadata.build_for(sequences, block_size, sp.rank, sp.size, device)
        order, pieces = metadata.plan.order, metadata.plan.pieces
    ids: list[int] = []
    for index, ranges in zip(order, pieces):
        for start, stop in ranges:
            ids.extend(token_ids[index][start:stop])
    return LocalBatch(host_to_device(torch.tensor(ids, dtype=torch.long), device), metadata, order)


class SequenceParallelBackend(AttentionBackend):
    """The AttentionBackend of one SP rank; `group` is its SP group (same TP rank, same heads)."""

    def __init__(self, group: ParallelGroup, kernel: str | None = None, decode_kernel: str | None = None):
        """`kernel` (prefill chunks) and `decode_kernel`: names in lse_attention.KERNELS; None: the
        fastest that matches the reference on this device, chosen at the first call."""
        self.group = group
        self.kernel_name, self.decode_kernel_name = kernel, decode_kernel
        self._kernels: tuple[LseKernel, LseKernel] | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if not isinstance(metadata, SequenceParallelMetadata):
            raise TypeError("the sequence-parallel backend needs SequenceParallelMetadata")
        (prefill_kernel, decode_kernel), plan = self._kernels_for(query, key), metadata.plan
        output = torch.empty_like(query)  # (T, H, D)
        ring_rows = plan.num_ring_rows
        if plan.ring:
            partial = self._prefill(query[:ring_rows], key[:ring_rows], value[:ring_rows], layer_cache, metadata,
                                    scale, prefill_kernel)
            output[:ring_rows] = partial.out
        if plan.decode:
            output[ring_rows:] = self._decode(query[ring_rows:], key[ring_rows:], value[ring_rows:], layer_cache,
                                              metadata, scale, decode_kernel)
        return output

    def _kernels_for(self, query: torch.Tensor, key: torch.Tensor) -> tuple[LseKernel, LseKernel]:
        if self._kernels is None:
            shape = (query.device, query.dtype, query.shape[1], key.shape[1], query.shape[2])
            if self.kernel_name is None:
                self.kernel_name = select_kernel(*shape, preference=PREFILL_PREFERENCE)[0]
            if self.decode_kernel_name is None:
                self.decode_kernel_name = select_kernel(*shape, preference=DECODE_PREFERENCE)[0]
            self._kernels = KERNELS[self.kernel_name], KERNELS[self.decode_kernel_name]
        return self._kernels

    # --- prefill chunks ----------------------------------------------------------------------
    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor,
                 metadata: SequenceParallelMetadata, scale: float, kernel: LseKernel) -> PartialSum:
        def store(src: int, block: torch.Tensor) -> None:  # block (2, R_src, KV, D)
            rows, slots = metadata.ring_writes[src]
            if rows.numel():
                write_kv(layer_cache, block[0, rows], block[1, rows], slots)

        partial = ring_attention(q, k, v, metadata.plan, self.group, scale, kernel, on_block=store)
        if metadata.plan.cached_ring():
            self._add_cached_context(partial, q, layer_cache, metadata, scale, kernel)
        return partial

    def _add_cached_context(self, partial: PartialSum, q: torch.Tensor, layer_cache: torch.Tensor,
                            metadata: SequenceParallelMetadata, scale: float, kernel: LseKernel) -> None:
        plan, size = metadata.plan, self.group.size
        mine = q[metadata.cached_queries]  # (Cq, H, D)
        visitors = [q.new_empty((_rows(plan.cached_rows(src)), *q.shape[1:])) for src in range(size)]
        self.group.all_to_all([mine] * size, visitors)
        answers = [self._attend_stripe(visitors[src], plan.cached_rows(src), layer_cache, metadata, scale, kernel)
                   for src in range(size)]  # per src: (its Cq, H, D + 1)
        returned = [answers[0].new_empty((mine.shape[0], *answers[0].shape[1:])) for _ in range(size)]
        self.group.all_to_all(answers, returned)
        packed = torch.stack(returned)  # (N, Cq, H, D + 1)
        out, lse = merge_stacked(packed[..., :-1], packed[..., -1])
        for (start, stop), ring in zip(plan.cached_rows(plan.rank), plan.cached_ring()):
            partial.add(ring.rows[0], out[start:stop], lse[start:stop])

    def _attend_stripe(self, queries: torch.Tensor, bounds: list[tuple[int, int]], layer_cache: torch.Tensor,
                       metadata: SequenceParallelMetadata, scale: float, kernel: LseKernel) -> torch.Tensor:
        """Another rank's cached-context queries over this rank's stripe -> packed partials."""
        plan = metadata.plan
        local_index = {ring.seq: j for j, ring in enumerate(plan.ring)}
        parts = []
        for (start, stop), ring in zip(bounds, plan.cached_ring()):
            count = local_count(ring.computed, plan.rank, plan.size)
            keys, values = stripe_context(layer_cache, metadata.block_table_tensor[local_index[ring.seq]], count)
            parts.append(_pack(*attention_with_lse(kernel, queries[start:stop], keys, values, scale, False)))
        return torch.cat(parts)  # (rows, H, D + 1); called only when some chunk has a cached context

    # --- decode tokens -----------------------------------------------------------------------
    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor,
                metadata: SequenceParallelMetadata, scale: float, kernel: LseKernel) -> torch.Tensor:
        plan = metadata.plan
        rows, slots = metadata.decode_writes
        if rows.numel():
            write_kv(layer_cache, k[rows], v[rows], slots)  # before attending: a token sees itself
        head_dim = q.shape[-1]
        packed = q.new_empty((len(plan.decode), q.shape[1], head_dim + 1),
                             dtype=torch.promote_types(q.dtype, torch.float32))  # (decodes, H, D + 1): one message
        for decode in plan.decode:
            count = local_count(decode.context_len, plan.rank, plan.size)
            table = metadata.block_table_tensor[len(plan.ring) + decode.row]
            keys, values = stripe_context(layer_cache, table, count)
            out, lse = attention_with_lse(kernel, q[decode.row:decode.row + 1], keys, values, scale, False)
            packed[decode.row, :, :head_dim] = out[0]
            packed[decode.row, :, head_dim] = lse[0]
        gathered = self.group.all_gather_stacked(packed)  # (N, decodes, H, D + 1)
        return merge_outputs(gathered[..., :head_dim], gathered[..., head_dim]).to(q.dtype)


def stripe_context(layer_cache: torch.Tensor, table: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` tokens of a sequence's stripe on this rank, (count, KV, D) each, from
    layer_cache (num_blocks, 2, block_size / N, KV, D) and its block table row."""
    block_ids = table[:-(-count // layer_cache.shape[2])]  # (blocks,)
    # K and V gathered apart: each gather is then contiguous and flattens without a second copy
    keys = layer_cache[block_ids, 0].flatten(0, 1)[:count]  # (count, KV, D)
    values = layer_cache[block_ids, 1].flatten(0, 1)[:count]
    return keys, values


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(n, H, D) and (n, H) -> (n, H, D + 1) in float32 (float64 for float64): one message."""
    dtype = torch.promote_types(lse.dtype, torch.float32)
    return torch.cat([out.to(dtype), lse.to(dtype)[..., None]], dim=-1)


def _rows(bounds: list[tuple[int, int]]) -> int:
    return bounds[-1][1] if bounds else 0
