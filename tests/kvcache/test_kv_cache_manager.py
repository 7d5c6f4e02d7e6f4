"""KVCacheManager: prefix hits, all-or-nothing allocation, sharing and freeing, exact block ids."""

from __future__ import annotations

import pytest

from kvcache.block_hash import hash_full_blocks, root_hash
from kvcache.kv_cache_manager import KVCacheManager

BLOCK_SIZE = 4
ROOT = root_hash("test-model")


def hashes(tokens: list[int]) -> list[bytes]:
    return hash_full_blocks(tokens, BLOCK_SIZE, ROOT)


def admit(manager: KVCacheManager, request_id: str, tokens: list[int]) -> tuple[list[int], int]:
    """Admit and fully prefill a prompt, as the scheduler would; returns (hit blocks, hit tokens)."""
    hit_blocks, hit_tokens = manager.find_cached_prefix(hashes(tokens), len(tokens))
    assert manager.allocate_slots(request_id, len(tokens), hit_blocks) is not None
    manager.cache_full_blocks(request_id, hashes(tokens), len(tokens))
    return hit_blocks, hit_tokens


def test_a_new_request_gets_blocks_in_id_order():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert manager.allocate_slots("a", 10) == [0, 1, 2]
    assert manager.allocate_slots("a", 12) == []
    assert manager.allocate_slots("a", 13) == [3]
    assert manager.block_table("a") == [0, 1, 2, 3]
    assert manager.num_free_blocks == 4
    assert manager.usage == 0.5


@pytest.mark.parametrize(
    ("num_prompt_tokens", "expected_hit_blocks"),
    [(16, 3), (17, 4), (13, 3), (12, 2), (5, 1), (4, 0), (1, 0), (0, 0)],
)
def test_find_cached_prefix_leaves_at_least_one_prompt_token_to_compute(
    num_prompt_tokens, expected_hit_blocks
):
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(20))
    admit(manager, "a", tokens)
    prompt = tokens[:num_prompt_tokens]
    hit_blocks, hit_tokens = manager.find_cached_prefix(hashes(prompt), len(prompt))
    assert hit_blocks == manager.block_table("a")[:expected_hit_blocks]
    assert hit_tokens == expected_hit_blocks * BLOCK_SIZE


def test_find_cached_prefix_stops_at_the_first_miss_and_does_not_retain():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(12)))
    other = list(range(8)) + [99, 99, 99, 99] + list(range(12, 20))
    assert manager.find_cached_prefix(hashes(other), len(other)) == ([0, 1], 8)
    assert [manager.pool.ref_count(b) for b in (0, 1)] == [1, 1]


def test_two_requests_with_a_shared_prefix_share_its_block_ids():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(10)))
    assert manager.block_table("a") == [0, 1, 2]
    hit_blocks, hit_tokens = admit(manager, "b", list(range(8)) + [50, 51, 52])
    assert (hit_blocks, hit_tokens) == ([0, 1], 8)
    assert manager.block_table("b") == [0, 1, 3]
    assert [manager.pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]


def test_freeing_one_sharer_keeps_the_other_s_blocks_intact():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(10)))
    admit(manager, "b", list(range(8)) + [50, 51, 52])
    manager.free("a")
    assert manager.block_table("b") == [0, 1, 3]
    assert [manager.pool.ref_count(b) for b in (0, 1, 3)] == [1, 1, 1]
    assert manager.pool.free_queue() == [4, 5, 6, 7, 2]
    # b still owns its blocks: allocating every free block never hands them out.
    assert manager.allocate_slots("c", 5 * BLOCK_SIZE) == [4, 5, 6, 7, 2]


def test_free_releases_tail_first_so_the_shared_prefix_is_evicted_last():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(12)))
    manager.free("a")
    assert manager.pool.free_queue() == [3, 4, 5, 2, 1, 0]
    assert manager.allocate_slots("b", 4 * BLOCK_SIZE) == [3, 4, 5, 2]
    # The first block survives eviction, so a prompt on that prefix still hits it.
    prompt = list(range(12))
    assert manager.find_cached_prefix(hashes(prompt), len(prompt)) == ([0, 1], 8)


def test_allocate_slots_returns_none_and_changes_nothing_when_out_of_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(8)))
    manager.free("a")  # blocks 0 and 1 are free but cached
    prompt = list(range(8)) + [7] * 8
    hit_blocks, _ = manager.find_cached_prefix(hashes(prompt), len(prompt))
    assert hit_blocks == [0, 1]
    before = (manager.pool.free_queue(), manager.pool.num_cached_blocks)
    # 17 tokens need 5 blocks: 2 hits + 3 new. 3 new <= 4 free, but the 2 hits leave the free
    # queue as well, so only 2 remain for the 3 new ones.
    assert manager.allocate_slots("b", len(prompt) + 1, hit_blocks) is None
    assert (manager.pool.free_queue(), manager.pool.num_cached_blocks) == before
    assert [manager.pool.ref_count(b) for b in range(4)] == [0, 0, 0, 0]
    with pytest.raises(KeyError):
        manager.block_table("b")
    assert manager.allocate_slots("b", len(prompt), hit_blocks) == [2, 3]
    assert manager.block_table("b") == [0, 1, 2, 3]


def test_growing_a_request_beyond_the_pool_returns_none_and_keeps_its_table():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert manager.allocate_slots("a", 12) == [0, 1, 2]
    assert manager.allocate_slots("a", 20) is None
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.num_free_blocks == 1


def test_cache_full_blocks_marks_only_new_full_blocks_as_the_request_grows():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(14))
    manager.allocate_slots("a", 6)
    manager.cache_full_blocks("a", hashes(tokens[:6]), 6)
    assert manager.pool.num_cached_blocks == 1
    manager.allocate_slots("a", 14)
    manager.cache_full_blocks("a", hashes(tokens), 14)
    assert [manager.pool.lookup(h) for h in hashes(tokens)] == [0, 1, 2]
    with pytest.raises(ValueError, match="full blocks"):
        manager.cache_full_blocks("a", hashes(tokens + [0] * 6), 20)


def test_a_duplicate_computed_block_stays_private_and_the_first_copy_keeps_the_name():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(9))
    for request_id in ("a", "b"):  # both admitted before either cached anything
        manager.allocate_slots(request_id, len(tokens))
    for request_id in ("a", "b"):
        manager.cache_full_blocks(request_id, hashes(tokens), len(tokens))
    assert [manager.pool.lookup(h) for h in hashes(tokens)] == [0, 1]
    assert manager.block_table("b") == [3, 4, 5]
    assert manager.pool.num_cached_blocks == 2


def test_prefix_caching_off_never_hits_nor_caches():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    tokens = list(range(12))
    admit(manager, "a", tokens)
    assert manager.pool.num_cached_blocks == 0
    assert manager.find_cached_prefix(hashes(tokens), len(tokens)) == ([], 0)


def test_freeing_an_unknown_or_already_freed_request_is_a_no_op():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    manager.allocate_slots("a", 4)
    manager.free("a")
    manager.free("a")
    manager.free("never-seen")
    assert manager.num_free_blocks == 4


def test_num_blocks_needed_counts_only_blocks_beyond_the_current_table():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert manager.num_blocks_needed("a", 9) == 3
    manager.allocate_slots("a", 9)
    assert manager.num_blocks_needed("a", 12) == 0
    assert manager.num_blocks_needed("a", 13) == 1


def test_cached_block_ids_are_accepted_only_on_a_request_s_first_call():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.allocate_slots("a", 4)
    with pytest.raises(ValueError, match="already has blocks"):
        manager.allocate_slots("a", 8, [0])


def test_cache_full_blocks_visits_each_block_once_across_steps_and_prefix_hits(monkeypatch):
    # A 1M-token request calls cache_full_blocks every step: it must cost O(new blocks).
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(12)))
    marked = []
    mark_cached = manager.pool.mark_cached
    monkeypatch.setattr(
        manager.pool, "mark_cached", lambda b, h: marked.append(b) or mark_cached(b, h)
    )
    tokens = list(range(8)) + [60] * 24  # 2 blocks hit, 6 computed over several steps
    hit_blocks, hit_tokens = manager.find_cached_prefix(hashes(tokens), len(tokens))
    manager.allocate_slots("b", hit_tokens, hit_blocks)
    for num_computed in range(hit_tokens + 1, len(tokens) + 1):
        manager.allocate_slots("b", num_computed)
        manager.cache_full_blocks("b", hashes(tokens[:num_computed]), num_computed)
    assert marked == manager.block_table("b")[2:]


def test_a_prefix_hit_evicted_before_allocate_slots_is_refused():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    admit(manager, "a", list(range(8)))
    manager.free("a")
    prompt = list(range(9))
    hit_blocks, _ = manager.find_cached_prefix(hashes(prompt), len(prompt))
    manager.allocate_slots("b", 3 * BLOCK_SIZE)  # evicts the hits
    with pytest.raises(ValueError, match="evicted"):
        manager.allocate_slots("c", len(prompt), hit_blocks)
