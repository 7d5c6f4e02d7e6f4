"""BlockPool: exact block ids, LRU eviction order, prefix-cache hits, misuse raising."""

from __future__ import annotations

import pytest

from kvcache.block_pool import BlockPool, NoFreeBlocksError

H0, H1, H2 = b"\x00" * 32, b"\x01" * 32, b"\x02" * 32


def assert_no_leak(pool: BlockPool) -> None:
    referenced = sum(1 for b in range(pool.num_blocks) if pool.ref_count(b) > 0)
    assert pool.num_free_blocks + referenced == pool.num_blocks


def test_allocate_takes_blocks_in_id_order_from_a_fresh_pool():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.free_queue() == [5, 6, 7]
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert_no_leak(pool)


def test_released_blocks_join_the_tail_in_release_order_and_are_reused_last():
    pool = BlockPool(8)
    pool.allocate(3)
    pool.release([2, 0, 1])
    assert pool.free_queue() == [3, 4, 5, 6, 7, 2, 0, 1]
    assert pool.allocate(6) == [3, 4, 5, 6, 7, 2]
    assert_no_leak(pool)


def test_a_shared_block_is_freed_only_when_its_last_reference_goes():
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    pool.retain([block])
    pool.release([block])
    assert pool.ref_count(block) == 1
    assert block not in pool.free_queue()
    pool.release([block])
    assert pool.free_queue()[-1] == block


def test_allocate_raises_and_changes_nothing_when_short():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.free_queue() == [3]
    assert pool.allocate(0) == []


def test_a_cached_free_block_stays_findable_until_allocate_reuses_it():
    evicted = []
    pool = BlockPool(3, on_evict=lambda block_id, block_hash: evicted.append((block_id, block_hash)))
    pool.allocate(2)
    assert pool.mark_cached(0, H0)
    assert pool.mark_cached(1, H1)
    pool.release([1, 0])
    assert pool.lookup(H0) == 0 and pool.lookup(H1) == 1
    assert pool.num_cached_blocks == 2
    assert pool.free_queue() == [2, 1, 0]

    assert pool.allocate(2) == [2, 1]
    assert evicted == [(1, H1)]
    assert pool.lookup(H1) is None
    assert pool.block_hash(1) is None
    assert pool.lookup(H0) == 0
    assert pool.num_cached_blocks == 1


def test_a_prefix_hit_retains_a_cached_block_out_of_the_free_queue():
    pool = BlockPool(4)
    pool.allocate(2)
    pool.mark_cached(1, H1)
    pool.release([1, 0])
    assert pool.free_queue() == [2, 3, 1, 0]

    pool.retain([pool.lookup(H1)])
    assert pool.ref_count(1) == 1
    assert pool.free_queue() == [2, 3, 0]
    assert pool.allocate(3) == [2, 3, 0]  # the retained block cannot be evicted
    assert pool.lookup(H1) == 1
    assert_no_leak(pool)


def test_the_first_block_cached_under_a_hash_wins():
    pool = BlockPool(4)
    pool.allocate(2)
    assert pool.mark_cached(0, H0)
    assert not pool.mark_cached(1, H0)
    assert pool.lookup(H0) == 0
    assert pool.block_hash(1) is None
    assert pool.num_cached_blocks == 1


def test_marking_a_block_again_with_its_own_hash_is_a_no_op():
    pool = BlockPool(2)
    pool.allocate(1)
    assert pool.mark_cached(0, H0)
    assert pool.mark_cached(0, H0)
    with pytest.raises(ValueError, match="another hash"):
        pool.mark_cached(0, H2)


def test_misuse_raises():
    pool = BlockPool(4)
    with pytest.raises(ValueError, match="ref count 0"):
        pool.release([0])
    with pytest.raises(ValueError, match="free"):
        pool.mark_cached(0, H0)
    for bad_id in (-1, 4):
        with pytest.raises(IndexError):
            pool.release([bad_id])
        with pytest.raises(IndexError):
            pool.retain([bad_id])
    with pytest.raises(IndexError, match="block id 4"):
        pool.retain([2, 4, 1])  # checked before any block is taken: nothing changes
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError):
        BlockPool(0)
    assert pool.free_queue() == [0, 1, 2, 3] and pool.ref_count(2) == 0


def test_unused_blocks_are_the_free_queue_s_head_and_are_counted():
    pool = BlockPool(6)
    assert pool.num_unused_blocks == 6
    first = pool.allocate(2)  # 0, 1
    assert pool.num_unused_blocks == 4 and pool.free_queue()[:4] == [2, 3, 4, 5]
    pool.mark_cached(first[0], b"h" * 32)
    pool.release(reversed(first))  # back at the tail: used now
    assert pool.num_unused_blocks == 4 and pool.free_queue() == [2, 3, 4, 5, 1, 0]
    pool.allocate(5)  # 2, 3, 4, 5 and then 1
    assert pool.num_unused_blocks == 0
    pool.retain([0])  # the cached block, found by hash
    assert pool.num_unused_blocks == 0 and pool.free_queue() == []


def test_bulk_lookups_answer_as_one_block_at_a_time():
    pool = BlockPool(6)
    blocks = pool.allocate(3)
    for index, block in enumerate(blocks):
        pool.mark_cached(block, bytes([index]) * 32)
    pool.release(reversed(blocks[1:]))  # 1 and 2 free, still cached
    hashes = [bytes([0]) * 32, bytes([1]) * 32, b"x" * 32, bytes([2]) * 32]
    assert pool.lookup_run(hashes) == [0, 1]  # stops at the first miss
    assert pool.num_free_among([0, 1, 2]) == 2
    assert pool.all_cached([0, 1, 2])
    pool.allocate(4)  # 3, 4, 5, then 2: evicted
    assert not pool.all_cached([0, 1, 2]) and pool.num_free_among([0, 1, 2]) == 1  # 1 is still free
