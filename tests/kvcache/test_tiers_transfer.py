"""The data plane of the KV tiers: the value format, the Redis store and the worker's transfers.

Round trips compare raw bits (every float pattern, NaNs included), through a real redis-server.
"""

from __future__ import annotations

import time

import pytest
import torch

from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block
from model_shards.kv_io.kv_transfer import KVTransfer, _runs
from model_shards.kv_io.namespace import block_key, key_namespace, key_prefix
from model_shards.kv_io.redis_store import RedisBlockStore, redact
from model_shards.kv_io.remote_block_io import RemoteBlockIO
from model_shards.kv_io.store import MemoryBlockStore
from protocol.kv_transfer_ops import (
    CHECKSUM,
    HIT,
    MISMATCH,
    MISSING,
    TRUNCATED,
    KVTransferOps,
)

FMT = BlockFormat("float16", (2, 2, 4, 2, 8), 2 * 2 * 4 * 2 * 8 * 2)
HASH = bytes(range(32))
PREFIX = key_prefix("test", key_namespace("fingerprint", "checkpoint"))
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_bits_cache(dtype: torch.dtype, num_blocks: int = 8) -> KVCacheTensors:
    cache = KVCacheTensors(num_blocks, num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype=dtype,
                           device="cpu")
    bits = cache.data.view(_INT_OF[dtype])
    half_range = 2 ** (8 * bits.element_size() - 1)
    bits.copy_(torch.randint(-half_range, half_range, bits.shape, generator=torch.Generator().manual_seed(0)))
    return cache


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(_INT_OF[a.dtype]), b.view(_INT_OF[b.dtype]))


def redis_transfer(cache: KVCacheTensors, url: str, num_slots: int = 8) -> KVTransfer:
    def connect(fmt, slots):
        store = RedisBlockStore([url], PREFIX, socket_timeout_s=1.0)
        return RemoteBlockIO(store, fmt, slots, threads_per_shard=2, max_pending_write_bytes=1 << 30)

    return KVTransfer(cache, num_slots, chunk_bytes=3 * cache.bytes_per_block, remote_factory=connect)


def run_until(transfer: KVTransfer, ops: KVTransferOps, done, timeout_s: float = 10.0):
    """Run ops, then empty steps, until `done(reports)`; returns all reports."""
    reports = [transfer.run(ops)]
    deadline = time.monotonic() + timeout_s
    while not done(reports):
        assert time.monotonic() < deadline, reports
        reports.append(transfer.run(KVTransferOps(poll_timeout_s=0.05)))
    return reports


def fetched(reports) -> dict[int, str]:
    return {slot: outcome for report in reports for slot, outcome in report.fetched}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_host_redis_round_trip_is_bit_exact(dtype, redis_server):
    source = random_bits_cache(dtype)
    transfer = redis_transfer(source, redis_server.url)
    hashes = [bytes([i]) * 32 for i in range(3)]
    saves = ((3, 0), (1, 1), (5, 2))  # device block -> slot
    run_until(transfer, KVTransferOps(saves=saves, write_throughs=tuple(zip((0, 1, 2), hashes))),
              lambda reports: sum(len(r.written) for r in reports) == 3)

    target = KVCacheTensors(8, 2, 16, 2, 8, dtype, "cpu")  # another worker, say
    restore = redis_transfer(target, redis_server.url)
    reports = run_until(restore, KVTransferOps(fetches=tuple(zip(hashes, (7, 5, 6)))),
                        lambda reports: len(fetched(reports)) == 3)
    assert fetched(reports) == {7: HIT, 5: HIT, 6: HIT}
    restore.run(KVTransferOps(loads=((7, 0), (5, 2), (6, 4))))
    for (block, _), restored in zip(saves, (0, 2, 4)):
        assert same_bits(target.block(restored), source.block(block))
    assert not target.block(1).any()  # nothing else written


@pytest.mark.parametrize("staged", [True, False])
def test_batched_copies_handle_scattered_and_consecutive_slots(staged):
    cache = random_bits_cache(torch.float32, num_blocks=10)
    transfer = KVTransfer(cache, num_slots=10, chunk_bytes=4 * cache.bytes_per_block, staged=staged)
    pairs = [(9, 4), (2, 5), (7, 6), (0, 0), (4, 9), (1, 1)]
    transfer.save(pairs)
    for block, slot in pairs:
        assert same_bits(transfer.host[slot], cache.block(block))
    before = cache.data.clone()
    transfer.load([(4, 3), (0, 8)])
    assert same_bits(cache.block(3), before[9]) and same_bits(cache.block(8), before[0])
    assert list(_runs([(0, 4), (1, 5), (2, 6), (3, 0), (4, 9), (7, 1), (8, 2)])) == [
        (0, 4, 3), (3, 0, 1), (4, 9, 1), (7, 1, 2)]


def test_the_codec_rejects_every_damaged_or_foreign_value():
    payload = torch.randn(FMT.nbytes // 2).half().numpy().tobytes()
    value = encode_block(FMT, HASH, payload)
    outcome, view = decode_block(FMT, HASH, value)
    assert outcome == HIT and bytes(view) == payload
    flipped = bytearray(value)
    flipped[-7] ^= 0x10
    assert decode_block(FMT, HASH, bytes(flipped))[0] == CHECKSUM
    assert decode_block(FMT, HASH, value[:-1])[0] == TRUNCATED
    assert decode_block(FMT, HASH, value + b"\0")[0] == TRUNCATED
    assert decode_block(FMT, HASH, value[:10])[0] == TRUNCATED
    assert decode_block(FMT, bytes(32), value)[0] == MISMATCH  # stored under another block's key
    other_shape = BlockFormat("float16", (2, 2, 4, 4, 4), FMT.nbytes)
    assert decode_block(other_shape, HASH, value)[0] == MISMATCH
    other_dtype = BlockFormat("bfloat16", FMT.shape, FMT.nbytes)
    assert decode_block(other_dtype, HASH, value)[0] == MISMATCH
    assert decode_block(FMT, HASH, b"XXXX" + value[4:])[0] == MISMATCH
    assert decode_block(FMT, HASH, None)[0] == MISSING


def test_the_store_shards_by_hash_and_answers_every_call(start_redis):
    servers = [start_redis(), start_redis()]
    store = RedisBlockStore([s.url for s in servers], PREFIX)
    items = [(bytes([i]) * 32, b"value-%d" % i) for i in range(64)]
    assert store.put(items) == [True] * 64
    assert all(server.client().dbsize() > 10 for server in servers)  # both shards hold some
    assert store.get([h for h, _ in items] + [b"\xff" * 32]) == [v for _, v in items] + [None]
    assert store.contains([items[0][0], b"\xff" * 32]) == [True, False]
    assert store.delete([h for h, _ in items[:10]]) == 10
    assert store.get([items[0][0]]) == [None]
    key = block_key(PREFIX, items[20][0])
    assert servers[int.from_bytes(items[20][0][:8], "little") % 2].client().ttl(key) == -1  # no ttl set
    assert key.startswith(b"test:kv:v2:")


def test_a_dead_shard_is_a_fast_miss_then_reconnects_after_backoff(start_redis, free_tcp_port):
    port = free_tcp_port
    clock = [0.0]
    store = RedisBlockStore([f"redis://:secret@127.0.0.1:{port}"], PREFIX, socket_timeout_s=0.5, backoff_s=1.0,
                            clock=lambda: clock[0])
    assert not store.ping() and not store.up and store.errors == 1
    assert store.get([HASH]) == [None] and store.errors == 1  # failed fast, no new connection attempt
    server = start_redis(port)
    server.client().config_set("requirepass", "secret")
    assert store.get([HASH]) == [None] and not store.up  # still inside the backoff window
    clock[0] = 1.5
    assert store.put([(HASH, b"v")]) == [True] and store.up
    assert store.get([HASH]) == [b"v"]
    assert redact(f"redis://:secret@127.0.0.1:{port}/0") == f"redis://127.0.0.1:{port}"


def test_ttl_and_key_namespace_apply_to_every_block(redis_server):
    store = RedisBlockStore([redis_server.url], PREFIX, ttl_s=100)
    store.put([(HASH, b"v")])
    assert 0 < redis_server.client().ttl(block_key(PREFIX, HASH)) <= 100
    assert key_namespace("f", "checkpoint-a") != key_namespace("f", "checkpoint-b")
    assert key_namespace("f", "c", rank=0) != key_namespace("f", "c", rank=1)


def test_writes_beyond_the_pending_bound_are_dropped_and_reported(redis_server):
    cache = random_bits_cache(torch.float16)

    def connect(fmt, slots):
        store = RedisBlockStore([redis_server.url], PREFIX)
        return RemoteBlockIO(store, fmt, slots, threads_per_shard=1, max_pending_write_bytes=0)

    transfer = KVTransfer(cache, 4, chunk_bytes=1 << 20, remote_factory=connect)
    report = transfer.run(KVTransferOps(saves=((0, 0),), write_throughs=((0, HASH),)))
    assert report.written == ((0, False),) and report.writes_dropped == 1
    assert redis_server.client().dbsize() == 0


def test_without_redis_remote_ops_come_back_as_misses_at_once():
    transfer = KVTransfer(random_bits_cache(torch.float16), 4, chunk_bytes=1 << 20)
    report = transfer.run(KVTransferOps(write_throughs=((1, HASH),), fetches=((HASH, 2),)))
    assert report.fetched == ((2, MISSING),) and report.written == ((1, False),)


def test_a_fetch_from_a_server_that_dies_is_a_miss_for_every_slot(start_redis):
    server = start_redis()
    cache = random_bits_cache(torch.float16)
    transfer = redis_transfer(cache, server.url)
    run_until(transfer, KVTransferOps(saves=((0, 0),), write_throughs=((0, HASH),)),
              lambda reports: sum(len(r.written) for r in reports) == 1)
    server.kill()
    reports = run_until(transfer, KVTransferOps(fetches=((HASH, 1), (bytes(32), 2))),
                        lambda reports: len(fetched(reports)) == 2)
    assert fetched(reports) == {1: MISSING, 2: MISSING}
    assert any(r.redis_errors for r in reports) and not reports[-1].redis_up


class BrokenStore(MemoryBlockStore):
    """A store whose every read and write raises: outcomes must still come back."""

    def get(self, hashes):
        raise RuntimeError("broken store")

    def put(self, items):
        raise RuntimeError("broken store")


def test_every_slot_comes_back_exactly_once_even_when_the_store_raises():
    cache = random_bits_cache(torch.float16)

    def connect(fmt, slots):
        return RemoteBlockIO(BrokenStore(), fmt, slots, threads_per_shard=2, max_pending_write_bytes=1 << 30)

    transfer = KVTransfer(cache, 8, chunk_bytes=1 << 20, remote_factory=connect)
    ops = KVTransferOps(saves=((0, 0),), write_throughs=((0, HASH),), fetches=((HASH, 1), (bytes(32), 2)))
    reports = run_until(transfer, ops, lambda rs: len(fetched(rs)) == 2 and sum(len(r.written) for r in rs) == 1)
    assert fetched(reports) == {1: MISSING, 2: MISSING}
    assert [written for report in reports for written in report.written] == [(0, False)]
