"""Ring attention over the zigzag split equals dense causal attention (float64, the long-context
reference), for several lengths and rank counts, and stores each position on exactly its stripe
owner. Runs on a spawned 4-rank gloo world; smaller rings use its first ranks."""

from __future__ import annotations

import pytest
import torch
from rank_jobs import run_ring

from model_shards.parallel.lse_attention import (
    PartialSum,
    merge_stacked,
    reference_attention,
)
from model_shards.parallel.sp_plan import (
    SequenceParallelPlan,
    StepSequence,
    local_count,
    zigzag_bounds,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def random_qkv(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(length, heads, HEAD_DIM, dtype=torch.float64, generator=generator)
                 for heads in (HEADS, KV_HEADS, KV_HEADS))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_ring_equals_dense_causal_attention_in_float64(world4, size):
    lengths = [2, 5, 16, 37, 64]  # shorter than 2N (empty pieces), not divisible by 2N, divisible
    tensors = [random_qkv(length, seed) for seed, length in enumerate(lengths)]
    queries, keys, values = ([t[j] for t in tensors] for j in range(3))
    results = [r for r in world4.call(run_ring, size, queries, keys, values) if r is not None]
    assert len(results) == size
    got = [torch.full_like(q, float("nan")) for q in queries]
    for rows, out, _ in results:
        for row, (index, position) in enumerate(rows):
            got[index][position] = out[row]
    for index, (q, k, v) in enumerate(tensors):
        expected, _ = reference_attention(q, k, v, HEAD_DIM ** -0.5, causal=True)
        assert torch.allclose(got[index], expected, rtol=0, atol=1e-12), f"length {len(q)} over {size} ranks"


@pytest.mark.parametrize("size", [2, 3, 4])
def test_each_position_is_stored_once_on_its_stripe_owner(world4, size):
    tensors = [random_qkv(length, seed) for seed, length in enumerate([7, 33])]
    queries, keys, values = ([t[j] for t in tensors] for j in range(3))
    results = [r for r in world4.call(run_ring, size, queries, keys, values) if r is not None]
    for rank, (_, _, stored) in enumerate(results):
        expected = [p for length in (7, 33) for p in range(length) if p % size == rank]
        assert sorted(stored) == sorted(expected)


def test_zigzag_pieces_cover_the_chunk_and_put_the_last_token_on_rank_zero():
    for sp_size in (1, 2, 3, 4):
        for n in (2, 3, 7, 8, 100):
            bounds = zigzag_bounds(n, sp_size)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert bounds[-1][1] > bounds[-1][0]  # piece 2N-1 (rank 0's second) holds token n-1
            plan = SequenceParallelPlan.build([StepSequence(list(range(200)), 5, n)], 4 * sp_size, 0, sp_size)
            assert plan.positions()[plan.sample_row(0)] == 5 + n - 1


def test_stripe_counts_add_up():
    for size in (1, 2, 3, 4):
        for tokens in range(0, 20):
            assert sum(local_count(tokens, rank, size) for rank in range(size)) == tokens


def test_partial_merges_are_exact_and_order_free():
    q, k, v = random_qkv(12, seed=9)
    scale = HEAD_DIM ** -0.5
    expected, expected_lse = reference_attention(q[-3:], k, v, scale, causal=False)
    pieces = [slice(0, 4), slice(4, 4), slice(4, 11), slice(11, 12)]  # one empty piece
    partials = [reference_attention(q[-3:], k[s], v[s], scale, causal=False) for s in pieces]
    summed = PartialSum(3, HEADS, HEAD_DIM, q.device, torch.float64)
    for out, lse in reversed(partials):
        summed.add(0, out, lse)
    stacked_out, stacked_lse = merge_stacked(torch.stack([out for out, _ in partials]),
                                             torch.stack([lse for _, lse in partials]))
    for out, lse in ((summed.out, summed.lse), (stacked_out, stacked_lse)):
        assert torch.allclose(out, expected, atol=1e-12) and torch.allclose(lse, expected_lse, atol=1e-12)


def test_reference_kernel_equals_torch_sdpa_in_float64():
    """The reference that every fused kernel and the ring are checked against, checked itself
    against torch's SDPA (math, float64), causal and not, with GQA."""
    import torch.nn.functional as F

    q, k, v = random_qkv(23, seed=5)
    for causal in (True, False):
        out, _ = reference_attention(q, k, v, 0.3, causal)
        expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0),
                                                  v.transpose(0, 1).repeat_interleave(2, 0), is_causal=causal,
                                                  scale=0.3).transpose(0, 1)
        assert torch.allclose(out, expected, atol=1e-12)
