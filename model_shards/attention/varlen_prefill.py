"""A step's short prefill chunks in one varlen attention call over their gathered contexts.

Beside a decoding batch, prompts arrive a few at a time, each a short chunk (a few hundred tokens)
over a long cached prefix. One call per chunk (chunked_prefill.py) is a causal call, a gather and a
prefix call merged by log-sum-exp: ~10 launches per chunk per layer, and each prefix call runs
few query tiles per head. Session 14's step anatomy (H100, 8B shape, 32K prefix + 256 new tokens):
60 decodes + 4 prompts took 30 ms, against 7.2 for the decodes and 4 x 3.4 for the prompts batched.
Here every such chunk of a step attends in one call, per group of sequences:

    gathered keys   [ seq a's blocks .......... pad ][ seq b's blocks ... pad ] ...   one index_select
    cu_keys         0, a's block-aligned end, ...     seqused_k: each context length
    queries         the chunks' rows of the step, back to back (already so in the step's layout)

FlashAttention-2 aligns a causal mask to the bottom right of each (queries, seqused_k) pair, so the
query j of a chunk of n new tokens sees keys 0 .. context - n + j: the paged layout's rule (base.py).
The new tokens' K/V are in the cache before this runs, so the gather holds the whole context.

The per-step part (which sequences, their block ids and offsets on the device) is built once per
step and used by every layer (`plan_groups`). Chunks that run cuDNN's planned shapes (a long prompt
alone, chunked_prefill.py) keep their own path: cuDNN is the faster kernel at those lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from model_shards.attention.base import AttentionMetadata
from model_shards.device import upload_packed
from model_shards.parallel.lse_attention import reference_attention

# Keys gathered for one call, in tokens: 1 GiB of K + V at 8 KV heads of 128 (bf16), within the
# 15% of the GPU a worker keeps off its KV cache (worker._kv_budget_bytes). A single context longer
# than this runs on its own path, as it did before.
PACKED_KEYS_MAX_TOKENS = 1 << 18
# A lone chunk keeps its own call: FlashAttention-2 splits a dense call's keys over the SMs
# (split-KV) when its query tiles are few, its varlen call does not.
MIN_GROUP_SEQUENCES = 2


@dataclass
class PrefillGroup:
    """Consecutive prefill sequences [first_seq, end_seq) of a step, attended in one call."""

    first_seq: int
    end_seq: int
    first_row: int  # the step's rows [first_row, end_row) are these sequences' new tokens
    end_row: int
    query_lens: list[int]
    context_lens: list[int]
    key_offsets: list[int]  # (n + 1,) block-aligned start of each sequence's keys in the gather
    max_queries: int
    max_keys: int
    block_ids: torch.Tensor  # (total_blocks,) long on the device: each context's blocks, in order
    cu_queries: torch.Tensor  # (n + 1,) int32 on the device
    cu_keys: torch.Tensor  # (n + 1,) int32 on the device: key_offsets
    seq_lens: torch.Tensor  # (n,) int32 on the device: context_lens


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PrefillGroup, float], torch.Tensor]


def plan_groups(metadata: AttentionMetadata, eligible: list[int],
                max_keys: int = PACKED_KEYS_MAX_TOKENS) -> list[PrefillGroup]:
    """Groups of consecutive eligible sequences (step indices, ascending) whose block-aligned
    contexts fit `max_keys` together, of at least MIN_GROUP_SEQUENCES each."""
    groups, run, gathered = [], [], 0
    for index in eligible:
        keys = metadata.num_blocks_of(index) * metadata.block_size  # its blocks, padding included
        if run and (run[-1] + 1 != index or gathered + keys > max_keys):
            groups.append(run)
            run, gathered = [], 0
        if keys <= max_keys:
            run.append(index)
            gathered += keys
    groups.append(run)
    return [_group(metadata, run) for run in groups if len(run) >= MIN_GROUP_SEQUENCES]


def _group(metadata: AttentionMetadata, run: list[int]) -> PrefillGroup:
    starts = metadata.query_start_loc
    query_lens = [starts[index + 1] - starts[index] for index in run]
    context_lens = [metadata.context_lens[index] for index in run]
    key_offsets, cu_queries = [0], [0]
    for index, count in zip(run, query_lens):
        key_offsets.append(key_offsets[-1] + metadata.num_blocks_of(index) * metadata.block_size)
        cu_queries.append(cu_queries[-1] + count)
    device = metadata.block_table_tensor.device
    block_ids = torch.cat([metadata.block_table_tensor[index, :metadata.num_blocks_of(index)] for index in run])
    cu_queries_tensor, cu_keys, seq_lens = upload_packed(  # one copy up for the three
        [torch.tensor(values, dtype=torch.int32) for values in (cu_queries, key_offsets, context_lens)], device)
    return PrefillGroup(
        first_seq=run[0], end_seq=run[-1] + 1, first_row=starts[run[0]], end_row=starts[run[-1] + 1],
        query_lens=query_lens, context_lens=context_lens, key_offsets=key_offsets,
        max_queries=max(query_lens), max_keys=max(context_lens), block_ids=block_ids.long(),
        cu_queries=cu_queries_tensor, cu_keys=cu_keys, seq_lens=seq_lens)


def group_attention(query: torch.Tensor, layer_cache: torch.Tensor, group: PrefillGroup, scale: float,
                    kernel: VarlenKernel) -> torch.Tensor:
    """The group's rows of the step's query (n, H, D) -> (n, H, D): each over its own context."""
    keys = layer_cache[:, 0].index_select(0, group.block_ids).flatten(0, 1)  # (gathered, KV, D)
    values = layer_cache[:, 1].index_select(0, group.block_ids).flatten(0, 1)
    return kernel(query[group.first_row:group.end_row].contiguous(), keys, values, group, scale)


def flash_varlen(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: PrefillGroup,
                 scale: float) -> torch.Tensor:
    """FlashAttention-2's varlen forward through torch's op; GQA natively."""
    return torch.ops.aten._flash_attention_forward(
        query, keys, values, group.cu_queries, group.cu_keys, group.max_queries, group.max_keys,
        0.0, True, False, scale=scale, seqused_k=group.seq_lens)[0]


def reference_varlen(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: PrefillGroup,
                     scale: float) -> torch.Tensor:
    """The same, one sequence at a time in plain torch (CPU tests; the probe's expectation)."""
    outs, row = [], 0
    for count, context, offset in zip(group.query_lens, group.context_lens, group.key_offsets):
        own = slice(offset, offset + context)
        outs.append(reference_attention(query[row:row + count], keys[own], values[own], scale, True)[0])
        row += count
    return torch.cat(outs)


def select_varlen_kernel(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                         head_dim: int) -> VarlenKernel | None:
    """flash_varlen when it matches the reference on a probe of this head shape (padded, ragged
    contexts; a query shorter than its context), else None: each chunk then takes its own path."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        return flash_varlen if _probe_matches(device, dtype, heads, kv_heads, head_dim) else None
    except (RuntimeError, TypeError, AttributeError):  # the op is missing or rejects an argument
        return None


def _probe_matches(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    block_size, blocks = 16, 24
    cache = torch.randn(blocks, 2, block_size, kv_heads, head_dim, device=device, dtype=dtype, generator=generator)
    sequences = [(list(range(0, 7)), 90, 13), (list(range(20, 23)), 0, 40), (list(range(7, 20)), 150, 45)]
    metadata = AttentionMetadata.build(sequences, block_size, device)
    group = plan_groups(metadata, [0, 1, 2])[0]
    query = torch.randn(group.end_row, heads, head_dim, device=device, dtype=dtype, generator=generator)
    scale = head_dim ** -0.5
    out = group_attention(query, cache, group, scale, flash_varlen)
    expected = group_attention(query, cache, group, scale, reference_varlen)
    # bf16 inputs: a correct kernel is within a few bf16 ulps; a wrong mask or offset is off by O(1)
    return bool(torch.isfinite(out).all()) and (out.float() - expected.float()).abs().max().item() < 0.05

