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


def test_shared_key_logits_are_carved_and_equal_a_plain_product():
    from model_shards.deepseek_v4.sink_attention import raw_logits

    generator = torch.Generator().manual_seed(0)
    q, keys = torch.randn(40, 4, 16, generator=generator), torch.randn(300, 16, generator=generator)
    logits = raw_logits(q, keys, capacity=40 * 4 * 320)
    assert logits.untyped_storage().nbytes() == 40 * 4 * 320 * 4 and logits.is_contiguous()
    torch.testing.assert_close(logits, torch.matmul(q, keys.T), rtol=0, atol=0)
    per_query = torch.randn(40, 7, 16, generator=generator)  # CSA's gathered top-k: its own size
    assert raw_logits(q, per_query, capacity=40 * 4 * 320).shape == (40, 4, 7)
