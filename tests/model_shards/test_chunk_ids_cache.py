"""model_folder/chunk_ids_cache.py: chunk text -> ids, bounded by tokens, least recently used out."""

from __future__ import annotations

import threading

import pytest

from model_folder.chunk_ids_cache import ChunkIdsCache


def test_a_chunk_is_found_by_its_text_and_counted():
    cache = ChunkIdsCache(max_tokens=100)
    assert cache.get("alpha\n") is None
    cache.put("alpha\n", [5, 6, 7])
    assert list(cache.get("alpha\n")) == [5, 6, 7]
    assert cache.get("alpha") is None  # another text, however close
    assert (cache.hits, cache.misses, cache.num_tokens, len(cache)) == (1, 2, 3, 1)


def test_the_least_recently_used_chunks_leave_first_to_stay_within_the_bound():
    cache = ChunkIdsCache(max_tokens=10)
    cache.put("a", [1] * 4)
    cache.put("b", [2] * 4)
    assert cache.get("a") is not None  # "b" is now the oldest
    cache.put("c", [3] * 4)  # 12 tokens: "b" goes
    assert cache.get("b") is None and list(cache.get("a")) == [1] * 4 and list(cache.get("c")) == [3] * 4
    assert cache.num_tokens == 8
    cache.put("d", [4] * 10)  # all of the bound: both others go
    assert (len(cache), cache.num_tokens) == (1, 10)


def test_a_chunk_put_again_replaces_its_ids_and_one_larger_than_the_bound_is_not_kept():
    cache = ChunkIdsCache(max_tokens=5)
    cache.put("a", [1, 2])
    cache.put("a", [1, 2, 3])
    assert (list(cache.get("a")), cache.num_tokens) == ([1, 2, 3], 3)
    cache.put("huge", list(range(6)))
    assert cache.get("huge") is None and cache.num_tokens == 3
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkIdsCache(max_tokens=-1)


def test_ids_up_to_32_bits_are_kept_as_given():
    cache = ChunkIdsCache()
    cache.put("x", [0, 2**32 - 1, 128_255])
    assert list(cache.get("x")) == [0, 2**32 - 1, 128_255]


def test_threads_putting_and_getting_keep_the_token_count_exact():
    cache = ChunkIdsCache(max_tokens=1_000)

    def work(thread: int) -> None:
        for index in range(2_000):
            cache.put(f"{thread}-{index % 300}", [index] * (1 + index % 7))
            cache.get(f"{(thread + 1) % 4}-{index % 300}")

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.num_tokens == sum(len(cache.get(key)) for key in list(cache._entries)) <= 1_000
