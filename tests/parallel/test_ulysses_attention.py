"""Ulysses attention (all-to-all over heads) equals dense causal attention and the ring, on the
spawned 2- and 4-rank gloo worlds, for MHA, GQA and GQA with fewer KV heads than ranks
(replicated), on both row layouts, at lengths that the rank count does not divide.

Tolerance 1e-5: inputs are float32 and every rank computes in float32 (the reference kernel), so
outputs carry float32 rounding only (softmax over at most 64 keys of values ~1: ~1e-7 relative),
whether one softmax (Ulysses) or log-sum-exp merges (the ring) produced them; the truth is the
same attention in float64. A wrong head, KV replica, row order or mask moves outputs by O(0.1)
(the planted misordered layout below shows the comparison failing).

DeepSpeed's DistributedAttention is not compared: DeepSpeed is not installed in the venv.
"""

from __future__ import annotations

import pytest
import torch
from rank_jobs import run_ring, run_ulysses, ulysses_error

from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.lse_attention import reference_attention
from model_shards.parallel.ulysses import HeadSplit, SequenceShards, ulysses_attention

HEAD_DIM, TOLERANCE = 8, 1e-5
# (query heads, KV heads): MHA, GQA with KV split over 2 and 4 ranks, KV split on 2 ranks but
# replicated on 4, and one KV head (MQA) replicated on every rank
HEAD_CASES = [(8, 8), (8, 4), (8, 2), (8, 1)]
LENGTHS = [3, 37, 64]  # fewer rows than 4 ranks (empty shards), divisible by neither 2 nor 4, divisible


def random_qkv(length: int, heads: int, kv_heads: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(length, h, HEAD_DIM, generator=generator) for h in (heads, kv_heads, kv_heads))


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the whole prompt in float64: the truth."""
    return reference_attention(q.double(), k.double(), v.double(), HEAD_DIM ** -0.5, causal=True)[0]


def assemble(shares: list, length: int, heads: int) -> torch.Tensor:
    """Every rank's (positions, outputs) -> (length, heads, D) by position; NaN where none wrote."""
    out = torch.full((length, heads, HEAD_DIM), float("nan"))
    for positions, rows in (share for share in shares if share is not None):
        out[list(positions)] = rows
    return out


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected.double()).abs().max().item()  # NaN (a row never written) fails too


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("heads,kv_heads", HEAD_CASES)
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ulysses_equals_dense_causal_attention(request, world_name, heads, kv_heads, layout):
    world = request.getfixturevalue(world_name)
    for seed, length in enumerate(LENGTHS):
        q, k, v = random_qkv(length, heads, kv_heads, seed)
        shares = world.call(run_ulysses, world.world_size, layout, q, k, v)
        got = assemble(shares, length, heads)
        assert max_error(got, dense(q, k, v)) <= TOLERANCE, f"length {length}"


@pytest.mark.parametrize("heads,kv_heads", HEAD_CASES)
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ulysses_equals_the_ring_on_the_same_rows(request, world_name, heads, kv_heads):
    """The zigzag layout is the ring's: both ops get identical local rows and must agree row by row."""
    world = request.getfixturevalue(world_name)
    size = world.world_size
    for seed, length in enumerate([37, 64]):
        q, k, v = random_qkv(length, heads, kv_heads, seed + 10)
        ulysses = world.call(run_ulysses, size, "zigzag", q, k, v)
        ring = world.call(run_ring, size, [q], [k], [v])
        for (positions, out), (ring_rows, ring_out, _) in zip(ulysses, ring):
            assert positions == [p for _, p in ring_rows]
            assert max_error(out, ring_out) <= TOLERANCE, f"length {length}"


def test_a_misordered_layout_fails_the_comparison(world2):
    """Rows fed in the zigzag order while the contiguous split is declared: the causal mask sees
    the wrong positions, and the output misses the truth by far more than the tolerance."""
    q, k, v = random_qkv(37, 8, 2, seed=5)
    shares = world2.call(run_ulysses, 2, "contiguous", q, k, v, "zigzag")
    assert max_error(assemble(shares, 37, 8), dense(q, k, v)) > 1e-2


def test_heads_the_ranks_do_not_divide_raise_value_error(world4):
    errors = world4.call(ulysses_error, 4, 6, 6)
    assert all(error is not None and "6 query heads over 4" in error for error in errors)
    errors = world4.call(ulysses_error, 4, 12, 3)  # 3 KV heads neither divide 4 ranks nor are a multiple
    assert all(error is not None and "KV heads=3" in error for error in errors)
    assert world4.call(ulysses_error, 4, 8, 2) == [None] * 4


def test_one_rank_is_plain_causal_attention():
    q, k, v = random_qkv(19, 4, 2, seed=7)
    for shards in (SequenceShards.contiguous(19, 1), SequenceShards.zigzag(19, 1)):
        out = ulysses_attention(q, k, v, shards, ParallelGroup.single(), HEAD_DIM ** -0.5, reference_attention)
        assert max_error(out, dense(q, k, v)) <= TOLERANCE


def test_shards_cover_every_position_once():
    for size in (1, 2, 3, 4):
        for length in range(20):
            for shards in (SequenceShards.contiguous(length, size), SequenceShards.zigzag(length, size)):
                positions = [p for rank in range(size) for p in shards.positions_of(rank)]
                assert sorted(positions) == list(range(length))
                assert shards.gathered_positions(torch.device("cpu")).tolist() == positions
                assert shards.length == length


def test_contiguous_shards_differ_by_at_most_one_row_and_need_no_reorder():
    shards = SequenceShards.contiguous(10, 4)
    assert [shards.rows(r) for r in range(4)] == [3, 3, 2, 2]
    assert shards.in_order() and not SequenceShards.zigzag(10, 2).in_order()


def test_each_rank_attends_with_the_kv_heads_its_query_heads_use():
    """Query head h uses KV head h // (H / KV): every rank's query heads map into its KV slice."""
    for heads, kv_heads in HEAD_CASES + [(32, 8), (16, 2)]:
        for size in (1, 2, 4, 8):
            if heads % size or (kv_heads < size and size % kv_heads):
                continue
            group = ParallelGroup(0, size, tuple(range(size)), None)
            split = HeadSplit.of(heads, kv_heads, group)
            group_size = heads // kv_heads
            for rank in range(size):
                used = {h // group_size for h in range(heads)[split.query[rank]]}
                assert used == set(range(kv_heads)[split.kv[rank]]), (heads, kv_heads, size, rank)
