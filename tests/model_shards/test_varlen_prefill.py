"""A step's short prefill chunks grouped into one varlen call (varlen_prefill.py), on the CPU.

The grouping is checked with exact sequence ids and offsets; the grouped path of the GPU backend
(Triton decode in the interpreter, the plain-torch varlen kernel in place of FlashAttention-2's)
against TorchSDPABackend on mixed steps. FlashAttention-2's own varlen kernel is probed against
the same reference when the backend starts on a GPU (select_varlen_kernel) and checked in
tests/gpu/test_prefill_plans.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model_shards.attention.base import AttentionMetadata  # noqa: E402
from model_shards.attention.chunked_prefill import PrefillKernels  # noqa: E402
from model_shards.attention.cudnn_triton import CudnnTritonBackend  # noqa: E402
from model_shards.attention.torch_sdpa import TorchSDPABackend  # noqa: E402
from model_shards.attention.varlen_prefill import (plan_groups, reference_varlen,  # noqa: E402
                                                   select_varlen_kernel)
from model_shards.parallel.lse_attention import reference_attention  # noqa: E402

BLOCK = 16


def metadata_of(sequences, block_ids=None):
    """(computed, new) per sequence -> metadata over consecutive blocks 0, 1, ... (or
    block_ids[0], block_ids[1], ...)."""
    tables, next_block = [], 0
    for computed, new in sequences:
        blocks = -(-(computed + new) // BLOCK) + 1  # one block allocated ahead, as the scheduler does
        tables.append([block_ids[b] if block_ids else b for b in range(next_block, next_block + blocks)])
        next_block += blocks
    return AttentionMetadata.build([(t, c, n) for t, (c, n) in zip(tables, sequences)], BLOCK, "cpu")


def test_groups_hold_consecutive_sequences_with_their_block_aligned_offsets():
    metadata = metadata_of([(40, 1), (100, 20), (0, 33), (7, 9)])
    [group] = plan_groups(metadata, [1, 2, 3])
    assert (group.first_seq, group.end_seq, group.first_row, group.end_row) == (1, 4, 1, 63)
    assert group.query_lens == [20, 33, 9] and group.context_lens == [120, 33, 16]
    assert group.key_offsets == [0, 128, 176, 192]  # 8, 3 and 1 blocks of 16: only the used blocks
    assert group.cu_queries.tolist() == [0, 20, 53, 62] and group.cu_keys.tolist() == [0, 128, 176, 192]
    assert group.seq_lens.tolist() == [120, 33, 16] and group.cu_keys.dtype == torch.int32
    # the tables (one block ahead each): 0..3, 4..12, 13..16, 17..18; the contexts use 8, 3 and 1 of theirs
    assert group.block_ids.tolist() == [*range(4, 12), 13, 14, 15, 17]
    assert (group.max_queries, group.max_keys) == (33, 120)


def test_groups_split_at_a_gap_and_at_the_key_budget_and_drop_lone_or_oversized_sequences():
    metadata = metadata_of([(0, 20), (0, 20), (0, 1), (0, 20), (0, 20), (0, 20), (200, 20), (0, 20), (0, 20)])
    groups = plan_groups(metadata, [0, 1, 3, 4, 5, 6, 7, 8], max_keys=64)
    # 0-1: 32 keys each; gap at 2; 3-4 fill 64; 5 alone would follow (then 6 is over the budget by
    # itself and skipped), so 5 is lone and dropped; 7-8 form the last group
    assert [(g.first_seq, g.end_seq) for g in groups] == [(0, 2), (3, 5), (7, 9)]
    assert plan_groups(metadata, [0]) == [] and plan_groups(metadata, []) == []


def paged_cache(num_blocks, kv_heads, head_dim, generator):
    return torch.randn(num_blocks, 2, 2, BLOCK, kv_heads, head_dim, generator=generator)[:, 0]


class RecordingVarlen:
    def __init__(self):
        self.groups = []

    def __call__(self, query, keys, values, group, scale):
        self.groups.append((group.first_seq, group.end_seq))
        return reference_varlen(query, keys, values, group, scale)


@pytest.mark.parametrize("sequences, grouped", [
    ([(33, 1), (64, 64), (130, 45), (0, 1)], [(1, 4)]),  # decodes, two chunks with cached prefixes, a one-token prompt
    ([(10, 1), (300, 1), (0, 70), (16, 16)], [(2, 4)]),  # decodes, a new prompt, a chunk on a block boundary
    ([(0, 20), (17, 1)], [(0, 2)]),  # a chunk first: the decode after it goes the prefill way
    ([(40, 1), (95, 1), (0, 70)], []),  # a lone prompt keeps its own call
])
def test_grouped_chunks_match_the_reference_backend(sequences, grouped):
    generator = torch.Generator().manual_seed(len(sequences) * 31 + sequences[-1][1])
    heads, kv_heads, head_dim = 8, 2, 32
    cache = paged_cache(200, kv_heads, head_dim, generator)
    expected_cache = cache.clone()
    shuffled = metadata_of(sequences, torch.randperm(200, generator=generator).tolist())
    tokens = shuffled.num_tokens
    query = torch.randn(tokens, heads, head_dim, generator=generator)
    key, value = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
    varlen = RecordingVarlen()
    backend = CudnnTritonBackend(varlen_kernel=varlen)
    out = backend.forward(query, key, value, cache, shuffled, 0.17)
    out_again = backend.forward(query, key, value, cache, shuffled, 0.17)  # a second layer: groups reused
    expected = TorchSDPABackend().forward(query, key, value, expected_cache, shuffled, 0.17)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    assert torch.equal(out, out_again)
    assert torch.equal(cache, expected_cache)
    assert varlen.groups == grouped * 2


def test_chunks_with_a_planned_piece_keep_their_own_path():
    """A chunk whose causal bucket was planned (a long prompt's) runs chunk_attention's pieces;
    the other two chunks of the step are grouped."""
    kernels = PrefillKernels(reference_attention, reference_attention, quantum=BLOCK, varlen=reference_varlen)
    kernels.mark_planned((128, 128, True))
    assert kernels.plans_a_piece_of(100, 0) and not kernels.plans_a_piece_of(200, 0)
    kernels.mark_planned((224, 32, False))  # 200 queries pad to 224; 40 keys = 32 + 8
    assert kernels.plans_a_piece_of(200, 40) and not kernels.plans_a_piece_of(200, 16)
    backend = CudnnTritonBackend(varlen_kernel=reference_varlen)
    metadata = metadata_of([(0, 100), (20, 150), (0, 140)])  # buckets 128, 160, 160
    assert [(g.first_seq, g.end_seq) for g in backend._groups(metadata, kernels)] == [(1, 3)]


def test_no_varlen_kernel_off_the_gpu():
    assert select_varlen_kernel(torch.device("cpu"), torch.bfloat16, 8, 2, 64) is None
    assert CudnnTritonBackend()._prefill_kernels(torch.zeros(1, 4, 8), torch.zeros(1, 2, BLOCK, 2, 8)).varlen is None
