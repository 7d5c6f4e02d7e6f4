"""AttentionMetadata.build_with_inputs: positions and cache slots of short sequences (decodes) are
built from Python ints, long chunks with tensors; the two kinds interleave in batch order and give
the same slots as the block table says, whatever the mix."""

from __future__ import annotations

import random

import pytest
import torch

from model_shards.attention.base import AttentionMetadata

BLOCK_SIZE = 16


def _expected(seqs):
    positions = [position for _, computed, new in seqs for position in range(computed, computed + new)]
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for table, computed, new in seqs for p in range(computed, computed + new)]  # fmt: skip
    return torch.tensor(positions), torch.tensor(slots)


@pytest.mark.parametrize("seed", range(20))
def test_slots_and_positions_follow_the_block_tables_in_batch_order(seed):
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randrange(1, 10)):
        new = rng.choice([1, 1, 2, 16, 17, 300])  # either side of the short-chunk bound
        computed = rng.randrange(0, 3000)
        num_blocks = (computed + new + BLOCK_SIZE - 1) // BLOCK_SIZE + rng.randrange(0, 3)
        seqs.append((rng.sample(range(50_000), num_blocks), computed, new))
    metadata, input_ids = AttentionMetadata.build_with_inputs(seqs, BLOCK_SIZE, "cpu", list(range(sum(n for *_, n in seqs))))
    positions, slots = _expected(seqs)
    assert torch.equal(metadata.positions, positions)
    assert torch.equal(metadata.slot_mapping, slots)
    assert metadata.query_start_loc[-1] == len(input_ids) == len(slots)
