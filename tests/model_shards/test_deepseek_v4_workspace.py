"""Large temporaries come from one allocation size, whatever the context (workspace.py)."""

import torch

from model_shards.deepseek_v4.workspace import carve, carved_elements

CAPACITY = 1 << 16


def test_large_temporaries_of_growing_contexts_all_take_the_bound():
    # The indexer's blocks: rows = capacity // entries, so rows * entries wanders just under it
    sizes = {carved_elements((CAPACITY // entries) * entries, CAPACITY) for entries in range(3000, 9000, 37)}
    assert sizes == {CAPACITY}


def test_small_and_unbounded_temporaries_keep_their_size():
    assert carved_elements(CAPACITY // 8 - 1, CAPACITY) == CAPACITY // 8 - 1
    assert carved_elements(CAPACITY // 8, CAPACITY) == CAPACITY
    assert carved_elements(5000, 0) == 5000
    assert carved_elements(CAPACITY + 1, CAPACITY) == CAPACITY + 1  # past the bound: nothing to share


def test_a_carved_tensor_is_a_contiguous_front_of_the_flat_allocation():
    scores = carve((100, 300), torch.int64, torch.device("cpu"), CAPACITY)
    assert scores.shape == (100, 300) and scores.is_contiguous()
    assert scores.untyped_storage().nbytes() == CAPACITY * 8
    scores.fill_(7)
    assert int(scores.sum()) == 7 * 100 * 300
