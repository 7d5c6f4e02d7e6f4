"""The worker side of the KV tiers: a host-memory block buffer and the moves the driver asks for.

The host pool is one tensor (num_slots, layers, 2, block_size, kv_heads, head_dim), pinned on
CUDA, laid out like the device cache so that a block is one contiguous piece in both. Slots are
allocated by the driver (kvcache/tier_manager.py); this file only moves bytes, in the order
kvcache/tiers/ops.py gives.

Copies are batched: one `index_select` gathers the device blocks of a chunk into a contiguous
staging tensor, then each run of consecutive host slots is one copy (per-16 KiB copies crawl at
~1 GB/s on an H100, >= 1 MiB pieces reach ~50 GB/s). The stream is synchronized once after the
saves and once after the loads, only in steps that have them: the saves because I/O threads
read those slots next, the loads because the driver may reuse their slots after this step; both
finish before the forward pass would need them anyway. Steps without transfers never sync here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from cluster.config import LongctxConfig
from kvcache.tiers.codec import BlockFormat
from kvcache.tiers.namespace import checkpoint_digest, key_namespace, key_prefix
from kvcache.tiers.ops import DEVICE_TO_HOST, HOST_TO_DEVICE, MISSING, KVTransferOps, KVTransferReport, TransferSample
from kvcache.tiers.redis_store import RedisBlockStore, redact
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_remote_io import Completed, RemoteBlockIO

logger = logging.getLogger(__name__)


class KVTransfer:
    def __init__(self, kv_cache: KVCacheTensors, num_slots: int, chunk_bytes: int,
                 remote_factory: Callable[[BlockFormat, torch.Tensor], RemoteBlockIO] | None = None):
        self.kv = kv_cache
        self.host = torch.empty((num_slots, *kv_cache.data.shape[1:]), dtype=kv_cache.dtype,
                                pin_memory=kv_cache.device.type == "cuda")
        self.format = BlockFormat(str(kv_cache.dtype).removeprefix("torch."), tuple(kv_cache.data.shape[1:]),
                                  kv_cache.bytes_per_block)
        self._chunk_blocks = max(1, chunk_bytes // kv_cache.bytes_per_block)
        slot_bytes = self.host.view(torch.uint8).view(num_slots, kv_cache.bytes_per_block).numpy()
        self.remote = remote_factory(self.format, slot_bytes) if remote_factory else None

    @classmethod
    def create(cls, config: LongctxConfig, kv_cache: KVCacheTensors, model_fingerprint: str) -> KVTransfer | None:
        """The worker's transfer engine, or None when the config has no host tier."""
        settings = config.kv_tiers
        num_slots = settings.host_bytes // kv_cache.bytes_per_block
        if not config.cache.enable_prefix_caching or num_slots == 0:
            return None
        remote_factory = None
        if settings.redis_urls:
            checkpoint = settings.redis_namespace or checkpoint_digest(config.model.path)
            prefix = key_prefix(settings.redis_key_prefix, key_namespace(model_fingerprint, checkpoint))
            remote_factory = functools.partial(_connect_redis, config, prefix)
        return cls(kv_cache, num_slots, settings.transfer_chunk_bytes, remote_factory)

    @property
    def num_slots(self) -> int:
        return self.host.shape[0]

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    # --- one step ---------------------------------------------------------------------------
    def run(self, ops: KVTransferOps) -> KVTransferReport:
        """Apply one step's ops in kvcache/tiers/ops.py's order; report what finished."""
        samples = []
        if ops.writebacks and self.remote is not None:
            self.remote.write_back(ops.writebacks)
        if ops.saves:
            samples.append(_timed(DEVICE_TO_HOST, lambda: self.save(ops.saves)))
        if ops.write_throughs and self.remote is not None:
            self.remote.write_through(ops.write_throughs)
        if ops.loads:
            samples.append(_timed(HOST_TO_DEVICE, lambda: self.load(ops.loads)))
        if ops.fetches and self.remote is not None:
            self.remote.fetch(ops.fetches)
        return self._report(ops, samples)

    def _report(self, ops: KVTransferOps, samples: list[TransferSample]) -> KVTransferReport:
        if self.remote is None:  # no Redis here: every remote op is a miss, reported at once
            done = Completed(fetched=[(slot, MISSING) for _, slot in ops.fetches],
                             written=[(slot, False) for slot, _ in ops.write_throughs])
            errors, up = 0, False
        else:
            done = self.remote.drain(ops.poll_timeout_s)
            errors, up = self.remote.new_errors(), self.remote.store.up
        return KVTransferReport(
            fetched=tuple(done.fetched), written=tuple(done.written), transfers=tuple(samples + done.transfers),
            blocking_seconds=sum(sample.seconds for sample in samples), writes_stored=done.stored,
            writes_dropped=done.dropped, redis_errors=errors, redis_up=up)

    # --- batched device <-> host copies -------------------------------------------------------
    def save(self, pairs: Sequence[tuple[int, int]]) -> int:
        """(device block, slot) pairs: device -> host. Returns the bytes moved."""
        for chunk in _chunks(pairs, self._chunk_blocks):
            blocks, slots = zip(*chunk)
            staged = self.kv.data.index_select(0, self._index(blocks))  # (n, layers, 2, block, heads, dim)
            for first, end, slot in _slot_runs(slots):
                self.host[slot : slot + end - first].copy_(staged[first:end], non_blocking=True)
        self._synchronize()
        return len(pairs) * self.kv.bytes_per_block

    def load(self, pairs: Sequence[tuple[int, int]]) -> int:
        """(slot, device block) pairs: host -> device. Returns the bytes moved."""
        for chunk in _chunks(pairs, self._chunk_blocks):
            slots, blocks = zip(*chunk)
            staged = torch.empty((len(chunk), *self.host.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
            for first, end, slot in _slot_runs(slots):
                staged[first:end].copy_(self.host[slot : slot + end - first], non_blocking=True)
            self.kv.data.index_copy_(0, self._index(blocks), staged)
        self._synchronize()
        return len(pairs) * self.kv.bytes_per_block

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)

    def _synchronize(self) -> None:
        if self.kv.device.type == "cuda":
            torch.cuda.synchronize(self.kv.device)


def _connect_redis(config: LongctxConfig, prefix: bytes, fmt: BlockFormat, slots) -> RemoteBlockIO:
    settings = config.kv_tiers
    store = RedisBlockStore(
        settings.redis_urls, prefix, ttl_s=settings.redis_ttl_s, socket_timeout_s=settings.redis_socket_timeout_s,
        max_connections=settings.redis_max_connections, backoff_s=settings.redis_retry_backoff_s,
        backoff_max_s=settings.redis_retry_backoff_max_s)
    if not store.ping():  # start anyway: the store retries with backoff and the tier comes back
        logger.warning("Redis KV tier unreachable at start (%s): serving without it until it answers",
                       ", ".join(redact(url) for url in settings.redis_urls))
    return RemoteBlockIO(store, fmt, slots, threads=settings.redis_io_threads,
                         max_pending_write_bytes=settings.redis_max_pending_write_bytes)


def _timed(path: str, move: Callable[[], int]) -> TransferSample:
    start = time.perf_counter()
    nbytes = move()
    return TransferSample(path, nbytes, time.perf_counter() - start)


def _chunks(pairs: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


def _slot_runs(slots: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(first index, end index, first slot) of each run of consecutive slots: one copy each."""
    first = 0
    for index in range(1, len(slots) + 1):
        if index == len(slots) or slots[index] != slots[index - 1] + 1:
            yield first, index, slots[first]
            first = index
