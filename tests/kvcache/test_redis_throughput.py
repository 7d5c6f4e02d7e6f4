"""What makes Redis throughput grow with shards (model_shards/kv_io/redis_store.py,
remote_block_io.py): large values stored as parts, I/O threads per shard, probes on their own
thread; and the start-up transfer probe (KVTransfer.calibrate). Real redis-servers."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from test_tiers_transfer import PREFIX, fetched, random_bits_cache, run_until, same_bits

from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.kv_transfer import KVTransfer
from model_shards.kv_io.namespace import block_key, part_key
from model_shards.kv_io.redis_store import RedisBlockStore
from model_shards.kv_io.remote_block_io import RemoteBlockIO
from protocol.kv_transfer_ops import CHECKSUM, DEVICE_TO_HOST, HIT, HOST_TO_DEVICE, HOST_TO_REDIS, REDIS_TO_HOST, \
    KVTransferOps

VALUE = 10_000  # bytes per value: 2 parts of 5000, as near 4096 as whole parts get
PART = 4096


def test_a_large_value_is_stored_as_parts_and_read_back_whole(start_redis):
    servers = [start_redis(), start_redis()]
    store = RedisBlockStore([s.url for s in servers], PREFIX, value_nbytes=VALUE, part_bytes=PART)
    items = [(bytes([i]) * 32, os.urandom(VALUE)) for i in range(8)]
    assert store.num_parts == 2 and store.put(items) == [True] * 8
    assert store.get([h for h, _ in items]) == [v for _, v in items]
    key = block_key(PREFIX, items[0][0])
    client = servers[store.shard_of(items[0][0])].client()
    assert [client.strlen(k) for k in (key, part_key(key, 1), part_key(key, 2))] == [5000, 5000, 0]
    assert RedisBlockStore([servers[0].url], PREFIX, value_nbytes=4096 + 100, part_bytes=PART).num_parts == 1
    assert RedisBlockStore([servers[0].url], PREFIX, value_nbytes=4 * 4096 + 100, part_bytes=PART).num_parts == 4
    assert store.contains([items[0][0], b"\xff" * 32]) == [True, False]


def test_a_block_missing_one_part_is_a_miss_and_delete_takes_every_part(redis_server):
    store = RedisBlockStore([redis_server.url], PREFIX, value_nbytes=VALUE, part_bytes=PART)
    items = [(bytes([i]) * 32, os.urandom(VALUE)) for i in range(3)]
    store.put(items)
    redis_server.client().delete(part_key(block_key(PREFIX, items[1][0]), 1))  # Redis evicted one part
    assert store.get([h for h, _ in items]) == [items[0][1], None, items[2][1]]
    assert store.contains([h for h, _ in items]) == [True, False, True]
    assert store.delete([h for h, _ in items]) == 3 and redis_server.client().dbsize() == 0


def parted_transfer(cache: KVCacheTensors, urls: list[str], part_bytes: int, threads: int = 2) -> KVTransfer:
    """Host slots: as many as the cache has blocks."""
    def connect(fmt, slots):
        store = RedisBlockStore(urls, PREFIX, socket_timeout_s=1.0, value_nbytes=fmt.header_nbytes + fmt.nbytes,
                                part_bytes=part_bytes)
        return RemoteBlockIO(store, fmt, slots, threads_per_shard=threads, max_pending_write_bytes=1 << 30)

    return KVTransfer(cache, cache.num_blocks, chunk_bytes=1 << 20, remote_factory=connect)


def test_blocks_in_parts_round_trip_bit_exact_and_a_damaged_part_fails_its_checksum(start_redis):
    servers = [start_redis(), start_redis()]
    source = random_bits_cache(torch.bfloat16)  # 2 KiB blocks: 2 parts (the header adds some)
    writer = parted_transfer(source, [s.url for s in servers], part_bytes=1024)
    hashes = [bytes([i]) * 32 for i in range(6)]
    run_until(writer, KVTransferOps(saves=tuple((b, b) for b in range(6)), write_throughs=tuple(enumerate(hashes))),
              lambda reports: sum(len(r.written) for r in reports) == 6)
    damaged = part_key(block_key(PREFIX, hashes[4]), 1)
    server = servers[writer.remote.store.shard_of(hashes[4])]
    server.client().setrange(damaged, 100, b"\x01\x02")
    target = KVCacheTensors(8, 2, 16, 2, 8, torch.bfloat16, "cpu")
    reader = parted_transfer(target, [s.url for s in servers], part_bytes=1024)
    reports = run_until(reader, KVTransferOps(fetches=tuple((h, 7 - i) for i, h in enumerate(hashes))),
                        lambda reports: len(fetched(reports)) == 6)
    assert fetched(reports) == {7: HIT, 6: HIT, 5: HIT, 4: HIT, 3: CHECKSUM, 2: HIT}
    reader.run(KVTransferOps(loads=((7, 0), (2, 5))))
    assert same_bits(target.block(0), source.block(0)) and same_bits(target.block(5), source.block(5))


def test_a_stopped_shard_holds_up_only_its_own_blocks(start_redis):
    """Each shard has its own I/O threads: with one server frozen (SIGSTOP) the other's blocks
    land at once, while the frozen one's wait out the socket timeout. (With the threads shared,
    the frozen shard's pipelines took every thread and the healthy shard waited behind them.)"""
    servers = [start_redis(), start_redis()]
    cache = random_bits_cache(torch.float16, num_blocks=16)
    transfer = parted_transfer(cache, [s.url for s in servers], part_bytes=1 << 20, threads=2)
    hashes = [bytes([i]) * 32 for i in range(16)]
    run_until(transfer, KVTransferOps(saves=tuple((b, b) for b in range(16)), write_throughs=tuple(enumerate(hashes))),
              lambda reports: sum(len(r.written) for r in reports) == 16)
    frozen = transfer.remote.store.shard_of(hashes[0])
    on_frozen = {slot for slot, h in enumerate(hashes) if transfer.remote.store.shard_of(h) == frozen}
    assert 2 < len(on_frozen) < 14
    os.kill(servers[frozen].process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        reports = run_until(transfer, KVTransferOps(fetches=tuple((h, slot) for slot, h in enumerate(hashes))),
                            lambda reports: set(fetched(reports)) >= set(range(16)) - on_frozen)
        assert time.monotonic() - start < 0.5  # the socket timeout is 1 s
    finally:
        os.kill(servers[frozen].process.pid, signal.SIGCONT)
    assert all(fetched(reports)[slot] == HIT for slot in set(range(16)) - on_frozen)


def test_the_start_up_probe_times_each_path_and_leaves_nothing_in_redis(redis_server):
    cache = random_bits_cache(torch.float16, num_blocks=8)
    transfer = parted_transfer(cache, [redis_server.url], part_bytes=1024)
    report = transfer.run(KVTransferOps(calibration_bytes=4 * cache.bytes_per_block))
    samples = {(sample.path, sample.nbytes) for sample in report.transfers}
    block = cache.bytes_per_block
    assert samples == {(DEVICE_TO_HOST, block), (DEVICE_TO_HOST, 4 * block), (HOST_TO_DEVICE, block),
                       (HOST_TO_DEVICE, 4 * block), (HOST_TO_REDIS, 4 * block), (REDIS_TO_HOST, block),
                       (REDIS_TO_HOST, 4 * block)}
    assert all(sample.seconds > 0 for sample in report.transfers)
    assert redis_server.client().dbsize() == 0
    assert not report.fetched and not report.written  # nothing the driver asked for


def test_the_start_up_probe_reports_no_redis_timings_when_redis_is_down(free_tcp_port):
    cache = random_bits_cache(torch.float16, num_blocks=8)
    transfer = parted_transfer(cache, [f"redis://127.0.0.1:{free_tcp_port}"], part_bytes=1024)
    report = transfer.run(KVTransferOps(calibration_bytes=1 << 20))
    assert {sample.path for sample in report.transfers} == {DEVICE_TO_HOST, HOST_TO_DEVICE}


@pytest.mark.parametrize("num_slots, expected", [(3, 3), (64, 8)])
def test_the_probe_is_bounded_by_the_host_and_device_blocks(num_slots, expected):
    cache = random_bits_cache(torch.float16, num_blocks=8)
    transfer = KVTransfer(cache, num_slots, chunk_bytes=1 << 20)
    largest = max(sample.nbytes for sample in transfer.calibrate(1 << 30))
    assert largest == expected * cache.bytes_per_block
