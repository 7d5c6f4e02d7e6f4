"""Tensor parallelism, sequence parallelism and both together give one rank's logits.

Float32 on gloo, 1e-4 absolute on logits of std ~4 (make_model's scaling): ranks only reorder
float32 sums (the TP all-reduces, log-sum-exp merges of attention partials), which moves logits
by ~1e-6; a wrong head, position, mask or stripe moves them by O(1). Every position's logits are
compared, for prompts that split unevenly, decode steps, a chunked prefill (a chunk over a cached
context), a mixed prefill + decode batch and a prefix-cache hit (blocks another sequence wrote).
"""

from __future__ import annotations

import pytest
import torch
from rank_jobs import run_model_steps

from model_shards.rank import RankContext

TOLERANCE = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 64


def tokens(count: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_scenario():
    """37-token prompt (37 = 4 * 9 + 1: uneven over 2 and 4 ranks), then 4 single tokens."""
    sequence = tokens(41, seed=1)
    return {"a": (list(range(0, 11)), sequence, 0)}, [{"a": 37}] + [{"a": 1}] * 4


def chunked_mixed_scenario():
    """A and B prefill together (B in two chunks, the second over B's cached first chunk, beside
    A's first decode token), then both decode."""
    sequences = {"a": (list(range(0, 5)), tokens(15, seed=2), 0), "b": (list(range(10, 16)), tokens(23, seed=3), 0)}
    return sequences, [{"a": 13, "b": 10}, {"a": 1, "b": 9}, {"a": 1, "b": 1}, {"b": 3}]


def prefix_hit_scenario():
    """C reuses A's first four full blocks (16 tokens, written by A) and computes the rest."""
    a = tokens(24, seed=4)
    c = a[:16] + tokens(11, seed=5)
    sequences = {"a": (list(range(20, 26)), a, 0), "c": (list(range(20, 24)) + list(range(30, 33)), c, 16)}
    return sequences, [{"a": 24}, {"c": 9}, {"c": 1}, {"c": 1}]


def short_chunks_scenario():
    """Chunks shorter than 2 * SP: some ranks compute no row of them (and still store theirs)."""
    return {"a": (list(range(40, 44)), tokens(9, seed=6), 0)}, [{"a": 2}, {"a": 3}, {"a": 1}, {"a": 2}, {"a": 1}]


SCENARIOS = {"decode": decode_scenario, "chunked_mixed": chunked_mixed_scenario, "prefix_hit": prefix_hit_scenario,
             "short_chunks": short_chunks_scenario}
LAYOUTS = {"tp2": (2, 1, "world2"), "sp2": (1, 2, "world2"), "tp2xsp2": (2, 2, "world4"), "sp4": (1, 4, "world4")}


def assemble(per_rank: list[list[dict]]) -> list[dict[str, dict[int, torch.Tensor]]]:
    """Per step, per sequence: position -> logits, from every rank's share."""
    steps = []
    for step in range(len(per_rank[0])):
        merged: dict[str, dict[int, torch.Tensor]] = {}
        for rank_steps in per_rank:
            for name, (positions, logits) in rank_steps[step].items():
                merged.setdefault(name, {}).update(zip(positions, logits))
        steps.append(merged)
    return steps


def assert_same_logits(parallel, single, what: str) -> None:
    for step, (got, expected) in enumerate(zip(parallel, single)):
        assert got.keys() == expected.keys(), f"{what} step {step}: sequences differ"
        for name in expected:
            assert sorted(got[name]) == sorted(expected[name]), f"{what} step {step} {name}: positions differ"
            for position, logits in expected[name].items():
                difference = (got[name][position] - logits).abs().max().item()
                assert difference <= TOLERANCE, f"{what} step {step} {name}@{position}: {difference:.3g}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_parallel_logits_equal_one_rank(layout, scenario, tiny_folder, request):
    tp, sp, world = LAYOUTS[layout]
    sequences, schedule = SCENARIOS[scenario]()
    args = (tiny_folder, BLOCK_SIZE, NUM_BLOCKS, sequences, schedule)
    single = assemble([run_model_steps(RankContext(0, 1, torch.device("cpu")), tiny_folder, 1, 1, *args[1:])])
    parallel = assemble(request.getfixturevalue(world).call(run_model_steps, tiny_folder, tp, sp, *args[1:]))
    assert_same_logits(parallel, single, f"{layout} {scenario}")


@pytest.mark.parametrize("layout", ["tp2", "tp2xsp2"])
def test_kv_heads_replicate_when_fewer_than_tp_ranks(layout, tiny_mqa_folder, request):
    tp, sp, world = LAYOUTS[layout]
    sequences, schedule = decode_scenario()
    args = (BLOCK_SIZE, NUM_BLOCKS, sequences, schedule)
    single = assemble([run_model_steps(RankContext(0, 1, torch.device("cpu")), tiny_mqa_folder, 1, 1, *args)])
    parallel = assemble(request.getfixturevalue(world).call(run_model_steps, tiny_mqa_folder, tp, sp, *args))
    assert_same_logits(parallel, single, f"{layout} mqa")
