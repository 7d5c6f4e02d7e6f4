"""The worker side of the KV tiers: a host-memory block buffer and the moves the driver asks for.

The host pool is one tensor (num_slots, layers, 2, block_size, kv_heads, head_dim), pinned on
CUDA, laid out like the device cache so that a block is one contiguous piece in both. Slots are
allocated by the driver (kvcache/tier_manager.py); this file only moves bytes, in the order
protocol/kv_transfer_ops.py gives.

Copies are batched. A run of blocks that are consecutive on both sides is one copy. Small
blocks on a GPU go through a device staging tensor: one `index_select` gathers a chunk of them,
then each run of consecutive host slots is one copy (per-16 KiB copies crawl at ~1 GB/s on an
H100, >= 1 MiB pieces reach ~50 GB/s). Blocks of >= 1 MiB, and every block on the CPU, are
copied straight to their place: staging would only add a pass over memory (and on the CPU,
fresh staging pages are slow to fault in). The stream is synchronized once after the saves and
once after the loads, only in steps that have them: the saves because I/O threads read those
slots next, the loads because the driver may reuse their slots after this step; both finish
before the forward pass would need them anyway. Steps without transfers never sync here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from cluster.config import LongctxConfig
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.block_seal import seal_for
from model_shards.kv_io.codec import BlockFormat
from model_shards.kv_io.namespace import checkpoint_digest, key_namespace, key_prefix
from model_shards.kv_io.redis_store import RedisBlockStore
from model_shards.kv_io.remote_block_io import Completed, RemoteBlockIO
from protocol.redis_urls import with_password
from protocol.kv_transfer_ops import (
    DEVICE_TO_HOST,
    HOST_TO_DEVICE,
    MISSING,
    KVTransferOps,
    KVTransferReport,
    TransferSample,
)

logger = logging.getLogger(__name__)

_DIRECT_COPY_BYTES = 1 << 20  # blocks at least this large are copied without staging


class KVTransfer:
    def __init__(self, kv_cache: KVCacheTensors, num_slots: int, chunk_bytes: int,
                 remote_factory: Callable[[BlockFormat, np.ndarray], RemoteBlockIO] | None = None,
                 staged: bool | None = None):
        """`staged`: copy through a device staging tensor; None picks by device and block size."""
        self.kv = kv_cache
        self.host = torch.empty((num_slots, *kv_cache.data.shape[1:]), dtype=kv_cache.dtype,
                                pin_memory=kv_cache.device.type == "cuda")
        self.format = BlockFormat(str(kv_cache.dtype).removeprefix("torch."), tuple(kv_cache.data.shape[1:]),
                                  kv_cache.bytes_per_block)
        self._chunk_blocks = max(1, chunk_bytes // kv_cache.bytes_per_block)
        # One row per block on both sides: copies of 2-D rows skip the per-dimension stride
        # bookkeeping that slices of the 6-D tensors cost.
        self._host_rows = self.host.view(num_slots, -1)  # (slots, block elements)
        self._kv_rows = kv_cache.data.view(kv_cache.num_blocks, -1)  # (blocks, block elements)
        if staged is None:
            staged = kv_cache.device.type == "cuda" and kv_cache.bytes_per_block < _DIRECT_COPY_BYTES
        self._staged = staged
        slot_bytes = self.host.view(torch.uint8).view(num_slots, kv_cache.bytes_per_block).numpy()
        self.remote = remote_factory(self.format, slot_bytes) if remote_factory else None

    @classmethod
    def create(cls, config: LongctxConfig, kv_cache: KVCacheTensors, model_fingerprint: str) -> KVTransfer | None:
        """The worker's transfer engine, or None when the config has no host tier."""
        num_slots = config.kv_tiers.host_bytes // kv_cache.bytes_per_block
        if not config.cache.enable_prefix_caching or num_slots == 0:
            return None
        return cls(kv_cache, num_slots, config.kv_tiers.transfer_chunk_bytes,
                   remote_factory_for(config, model_fingerprint))

    @property
    def num_slots(self) -> int:
        return self.host.shape[0]

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    # --- one step ---------------------------------------------------------------------------
    def run(self, ops: KVTransferOps) -> KVTransferReport:
        """Apply one step's ops in protocol/kv_transfer_ops.py's order; report what finished."""
        samples = []
        if ops.writebacks and self.remote is not None:
            self.remote.write_back(ops.writebacks)
        if ops.saves:
            samples.append(_timed(DEVICE_TO_HOST, lambda: self.save(ops.saves, ops.window_saves)))
        if ops.write_throughs and self.remote is not None:
            self.remote.write_through(ops.write_throughs)
        if ops.loads:
            samples.append(_timed(HOST_TO_DEVICE, lambda: self.load(ops.loads, ops.window_loads)))
        if ops.probes and self.remote is not None:
            self.remote.probe(ops.probes)
        if ops.fetches and self.remote is not None:
            self.remote.fetch(ops.fetches)
        if ops.calibration_bytes:
            samples += self.calibrate(ops.calibration_bytes)
        return self._report(ops, samples)

    def calibrate(self, nbytes: int) -> list[TransferSample]:
        """Time one block and about `nbytes` each way, device <-> host and host <-> Redis, as
        scattered as in serving (blocks and slots in opposite orders: no copy merges). Blocks and
        slots from 0: nothing is in use before the first request. Twice; the second is kept."""
        count = max(1, min(self.num_slots, self.kv.num_blocks, nbytes // self.kv.bytes_per_block))
        samples: list[TransferSample] = []
        for _ in range(2):  # the first pass pays first-touch and connection costs
            samples = []
            for n in sorted({1, count}):
                pairs = [(index, n - 1 - index) for index in range(n)]
                samples.append(_timed(DEVICE_TO_HOST, lambda: self.save(pairs)))
                samples.append(_timed(HOST_TO_DEVICE, lambda: self.load(pairs)))
        if self.remote is not None:
            samples += self.remote.calibrate(list(range(count)))
        return samples

    def _report(self, ops: KVTransferOps, samples: list[TransferSample]) -> KVTransferReport:
        if self.remote is None:  # no Redis here: every remote op is a miss, reported at once
            done = Completed(probed=[(probe_id, (False,) * len(hashes)) for probe_id, hashes in ops.probes],
                             fetched=[(slot, MISSING) for _, slot in ops.fetches],
                             written=[(slot, False) for slot, _ in ops.write_throughs])
            errors, up = 0, False
        else:
            done = self.remote.drain(ops.poll_timeout_s)
            errors, up = self.remote.new_errors(), self.remote.store.up
        return KVTransferReport(
            probed=tuple(done.probed), fetched=tuple(done.fetched), written=tuple(done.written),
            transfers=tuple(samples + done.transfers), blocking_seconds=sum(sample.seconds for sample in samples),
            writes_stored=done.stored, writes_dropped=done.dropped, redis_errors=errors, redis_up=up)

    # --- batched device <-> host copies -------------------------------------------------------
    def save(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(device block, slot) pairs: device -> host. Returns the bytes moved. (`window_pairs`:
        a hybrid model's, model_shards/deepseek_v4/kv_tiers.py; a dense cache has none.)"""
        if self._staged:
            for chunk in _chunks(pairs, self._chunk_blocks):
                self._save_staged(chunk)
        else:
            copy_runs(self._kv_rows, self._host_rows, pairs)
        self._synchronize()
        return len(pairs) * self.kv.bytes_per_block

    def load(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(slot, device block) pairs: host -> device. Returns the bytes moved."""
        if self._staged:
            for chunk in _chunks(pairs, self._chunk_blocks):
                self._load_staged(chunk)
        else:
            copy_runs(self._host_rows, self._kv_rows, pairs)
        self._synchronize()
        return len(pairs) * self.kv.bytes_per_block

    def _save_staged(self, chunk: Sequence[tuple[int, int]]) -> None:
        blocks, slots = zip(*chunk)
        staged = self._kv_rows.index_select(0, self._index(blocks))  # (n, block elements), contiguous
        copy_runs(staged, self._host_rows, list(enumerate(slots)))

    def _load_staged(self, chunk: Sequence[tuple[int, int]]) -> None:
        slots, blocks = zip(*chunk)
        staged = torch.empty((len(chunk), self._kv_rows.shape[1]), dtype=self.kv.dtype, device=self.kv.device)
        copy_runs(self._host_rows, staged, [(slot, index) for index, slot in enumerate(slots)])
        self._kv_rows.index_copy_(0, self._index(blocks), staged)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)

    def _synchronize(self) -> None:
        if self.kv.device.type == "cuda":
            torch.cuda.synchronize(self.kv.device)


def remote_factory_for(config: LongctxConfig, model_fingerprint: str
                       ) -> Callable[[BlockFormat, np.ndarray], RemoteBlockIO] | None:
    """What connects a worker's host slots to Redis (None without Redis): keys under the
    model's fingerprint and checkpoint, so that another model or layout never hits."""
    settings = config.kv_tiers
    if not settings.redis_urls:
        return None
    checkpoint = settings.redis_namespace or checkpoint_digest(config.model.path)
    prefix = key_prefix(settings.redis_key_prefix, key_namespace(model_fingerprint, checkpoint))
    return functools.partial(_connect_redis, config, prefix)


def _connect_redis(config: LongctxConfig, prefix: bytes, fmt: BlockFormat, slots) -> RemoteBlockIO:
    settings = config.kv_tiers
    store = RedisBlockStore(
        _redis_urls(settings), prefix, ttl_s=settings.redis_ttl_s, socket_timeout_s=settings.redis_socket_timeout_s,
        max_connections=max(settings.redis_max_connections, settings.redis_io_threads),
        backoff_s=settings.redis_retry_backoff_s, backoff_max_s=settings.redis_retry_backoff_max_s,
        value_nbytes=fmt.header_nbytes + fmt.nbytes, part_bytes=settings.redis_value_part_bytes)
    if not store.ping():  # start anyway: the store retries with backoff and the tier comes back
        logger.warning("Redis KV tier: %s unreachable at start; serving without them until they answer",
                       ", ".join(store.unreachable_shards()))
    seal = seal_for(settings.redis_mac_key, settings.redis_mac_key_file, context=prefix)
    return RemoteBlockIO(store, fmt, slots, threads_per_shard=settings.redis_io_threads,
                         max_pending_write_bytes=settings.redis_max_pending_write_bytes, seal=seal,
                         health_check_period_s=settings.redis_health_check_period_s)


def _redis_urls(settings) -> tuple[str, ...]:
    """The configured URLs, with the password from `redis_password_file` where they carry none."""
    if settings.redis_password_file is None:
        return settings.redis_urls
    try:
        with open(settings.redis_password_file) as file:
            password = file.read().strip()
    except OSError as error:
        raise ValueError(f"kv_tiers.redis_password_file: cannot read {settings.redis_password_file}: "
                         f"{error.strerror}") from None
    return tuple(with_password(url, password) for url in settings.redis_urls)


def _timed(path: str, move: Callable[[], int]) -> TransferSample:
    start = time.perf_counter()
    nbytes = move()
    return TransferSample(path, nbytes, time.perf_counter() - start)


def _chunks(pairs: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


def copy_runs(source: torch.Tensor, target: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """target[t] = source[s] for each (s, t), one copy per run consecutive on both sides."""
    for first_source, first_target, count in _runs(pairs):
        target[first_target : first_target + count].copy_(source[first_source : first_source + count],
                                                          non_blocking=True)


def _runs(pairs: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(first source, first target, length) of each run of pairs that step by one on both sides."""
    start = 0
    for index in range(1, len(pairs) + 1):
        if (index == len(pairs) or pairs[index][0] != pairs[index - 1][0] + 1
                or pairs[index][1] != pairs[index - 1][1] + 1):
            yield pairs[start][0], pairs[start][1], index - start
            start = index
