"""Blocks between the worker's host slots and a remote BlockStore (Redis), on background threads.

The worker's step only submits: a write-back copies its slot first (the driver reuses the slot
at once), a write-through and a fetch touch their slot later on an I/O thread (the driver holds
those slots until they come back in a report). Values are encoded, sealed (crc32 or a keyed MAC)
and verified on the I/O threads (`model_shards/kv_io/codec.py`; the seals and the copies release
the GIL), so nothing in the step waits on Redis. Every submitted fetch and write-through produces
exactly one outcome, whatever fails, because the driver frees its slot only then.

Parallelism grows with the shards: each shard has its own `threads_per_shard` I/O threads (and
as many connections), and a batch is cut into pipelines of one shard each, so that four servers
are read by four times the threads, and a slow or down shard holds up only its own. Probes and
pings run on a thread of their own: a probe never queues behind a gigabyte of writes.

Torch-free: the host slots arrive as a (num_slots, block bytes) uint8 numpy view.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from model_shards.kv_io.block_seal import CHECKSUM_SEAL, Seal
from model_shards.kv_io.codec import BlockFormat, check_block, encode_block_into
from model_shards.kv_io.store import BlockStore
from protocol.kv_transfer_ops import (
    HIT,
    HOST_TO_REDIS,
    MISSING,
    REDIS_TO_HOST,
    TransferSample,
)

logger = logging.getLogger(__name__)

# Bytes per Redis pipeline. Small values need several per round trip to hide its latency, but
# a long pipeline of large ones is slower: 2 MiB values read at 2.6 GB/s one or two per
# pipeline and 1.3 GB/s eight per pipeline (4 threads, loopback). Parallel pipelines on
# separate connections hide the latency instead.
_PIPELINE_BYTES = 4 << 20


@dataclass
class Completed:
    """What finished since the last drain."""

    probed: list[tuple[int, tuple[bool, ...]]] = field(default_factory=list)  # (probe id, present)
    fetched: list[tuple[int, str]] = field(default_factory=list)  # (slot, outcome)
    written: list[tuple[int, bool]] = field(default_factory=list)  # (write-through slot, stored)
    transfers: list[TransferSample] = field(default_factory=list)
    stored: int = 0
    dropped: int = 0


class _BatchClock:
    """Wall time of one batch split over parallel pipelines: one sample when the last ends."""

    def __init__(self, path: str, num_chunks: int):
        self.path, self._remaining, self._nbytes = path, num_chunks, 0
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    def chunk_done(self, nbytes: int) -> TransferSample | None:
        with self._lock:
            self._remaining -= 1
            self._nbytes += nbytes
            if self._remaining:
                return None
        return TransferSample(self.path, self._nbytes, time.perf_counter() - self._start)


_WriteItem = tuple[int | None, bytes, np.ndarray | None]  # (write-through slot or None, hash, copied payload)


class RemoteBlockIO:
    def __init__(self, store: BlockStore, fmt: BlockFormat, slots: np.ndarray, *, threads_per_shard: int,
                 max_pending_write_bytes: int, seal: Seal = CHECKSUM_SEAL, health_check_period_s: float = 5.0):
        """`seal`: what each value carries and each read checks (kvcache/tiers/block_seal.py)."""
        self.store = store
        self.fmt = fmt
        self.seal = seal
        self._slots = slots  # (num_slots, fmt.nbytes) uint8, a view of the host pool
        self._pipeline_blocks = max(1, _PIPELINE_BYTES // fmt.nbytes)
        self._shard_threads = [ThreadPoolExecutor(threads_per_shard, thread_name_prefix=f"kv-redis-{shard}")
                               for shard in range(store.num_shards)]
        self._control = ThreadPoolExecutor(1, thread_name_prefix="kv-redis-probe")  # probes and pings
        self._cond = threading.Condition()
        self._completed = Completed()
        self._reads_in_flight = 0  # probes and fetched blocks
        self._writes_in_flight = 0  # write chunks submitted, not finished
        self._pending_write_bytes = 0
        self._max_pending_write_bytes = max_pending_write_bytes
        self._errors_reported = 0
        self._ping_pending = False
        self._health_check_period_s = health_check_period_s
        self._last_ping = time.monotonic()  # the store was pinged when it was connected
        self._local = threading.local()  # per I/O thread: reused value buffers

    # --- submitting (the worker's step thread) ------------------------------------------------
    def write_back(self, items: Sequence[tuple[int, bytes]]) -> None:
        """(slot, hash): copy each slot now, write it later; not reported per slot."""
        self._submit_writes([(None, block_hash, self._slots[slot].copy()) for slot, block_hash in items])

    def write_through(self, items: Sequence[tuple[int, bytes]]) -> None:
        """(slot, hash): read each slot on an I/O thread; each comes back in `written`."""
        self._submit_writes([(slot, block_hash, None) for slot, block_hash in items])

    def fetch(self, items: Sequence[tuple[bytes, int]]) -> None:
        """(hash, slot): fill each slot from the store; each comes back in `fetched`."""
        chunks = self._pipelines(items, lambda item: item[0])
        clock = _BatchClock(REDIS_TO_HOST, len(chunks))
        with self._cond:
            self._reads_in_flight += len(items)
        for shard, chunk in chunks:
            self._shard_threads[shard].submit(self._fetch_chunk, chunk, clock)

    def probe(self, items: Sequence[tuple[int, Sequence[bytes]]]) -> None:
        """(probe id, hashes): which of the hashes the store holds; each comes back in `probed`."""
        with self._cond:
            self._reads_in_flight += len(items)
        for probe_id, hashes in items:
            self._control.submit(self._probe, probe_id, hashes)

    def calibrate(self, slots: Sequence[int]) -> list[TransferSample]:
        """Time writing these slots to the store under throwaway keys, then probing and reading
        back one of them and all of them, as a prefetch does; the keys are deleted after. For
        the start-up probe only: nothing else may be in flight. No samples if the store fails."""
        hashes = [os.urandom(32) for _ in slots]
        try:
            write_s, stored = self._run_parallel(self._write, [(slot, h, None) for slot, h in zip(slots, hashes)],
                                                 lambda item: item[1])
            samples = [TransferSample(HOST_TO_REDIS, len(slots) * self.fmt.nbytes, write_s)]
            succeeded = all(flag for chunk in stored for flag in chunk)
            for count in sorted({1, len(slots)}):
                start = time.perf_counter()
                self.store.contains(hashes[:count])
                _, outcomes = self._run_parallel(self._read, list(zip(hashes, slots))[:count], lambda item: item[0])
                samples.append(TransferSample(REDIS_TO_HOST, count * self.fmt.nbytes, time.perf_counter() - start))
                succeeded = succeeded and all(outcome == HIT for chunk in outcomes for outcome in chunk)
        finally:
            self.store.delete(hashes)
        return samples if succeeded else []

    def drain(self, timeout_s: float = 0.0) -> Completed:
        """Everything finished so far; waits up to `timeout_s` for a read or a write to finish
        if none has. (Waiting, not spinning: a caller polling in a loop would otherwise hold the
        GIL that the I/O threads need.)"""
        self._check_health()
        with self._cond:
            done = self._completed
            if (timeout_s > 0 and (self._reads_in_flight or self._writes_in_flight)
                    and not (done.fetched or done.probed or done.written)):
                self._cond.wait(timeout_s)
            completed, self._completed = self._completed, Completed()
        return completed

    def _check_health(self) -> None:
        # While the store is down the driver sends it nothing, so something else must notice
        # that it is back: a background ping, which the store itself spaces out by its backoff.
        # While it is up but idle nothing would notice it fail: a ping every period. (The driver
        # runs a step at least that often while Redis is configured, requests or not.)
        now = time.monotonic()
        if self._ping_pending or (self.store.up and now - self._last_ping < self._health_check_period_s):
            return
        self._ping_pending, self._last_ping = True, now
        self._control.submit(self._ping)

    def _ping(self) -> None:
        try:
            self.store.ping()
        finally:
            self._ping_pending = False

    def new_errors(self) -> int:
        errors = self.store.errors
        new, self._errors_reported = errors - self._errors_reported, errors
        return new

    def close(self, write_timeout_s: float = 10.0) -> None:
        """Let submitted writes finish (up to `write_timeout_s`: a write-back may hold the only
        copy of a block), drop queued reads, then close the connections."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writes_in_flight, write_timeout_s)
        for pool in (*self._shard_threads, self._control):
            pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def _pipelines(self, items: Sequence, hash_of: Callable) -> list[tuple[int, list]]:
        """(shard, items) pipelines: the items of each shard, cut into pieces of about
        _PIPELINE_BYTES, the shards interleaved so that every shard starts at once."""
        by_shard: dict[int, list] = {}
        for item in items:
            by_shard.setdefault(self.store.shard_of(hash_of(item)), []).append(item)
        pieces = [[(shard, group[start : start + self._pipeline_blocks])
                   for start in range(0, len(group), self._pipeline_blocks)] for shard, group in by_shard.items()]
        return [piece for round_ in itertools.zip_longest(*pieces) for piece in round_ if piece is not None]

    def _run_parallel(self, work: Callable[[list], list], items: list, hash_of: Callable) -> tuple[float, list]:
        """work(pipeline) on every pipeline of `items` at once, on the shards' threads; (seconds
        until the last is done, each pipeline's result)."""
        start = time.perf_counter()
        futures = [self._shard_threads[shard].submit(work, chunk) for shard, chunk in self._pipelines(items, hash_of)]
        wait(futures)
        return time.perf_counter() - start, [future.result() for future in futures]

    def _submit_writes(self, items: list[_WriteItem]) -> None:
        for shard, chunk in self._pipelines(items, lambda item: item[1]):
            nbytes = len(chunk) * self.fmt.nbytes
            with self._cond:
                admitted = self._pending_write_bytes + nbytes <= self._max_pending_write_bytes
                self._pending_write_bytes += nbytes if admitted else 0
                self._writes_in_flight += 1 if admitted else 0
            if admitted:
                self._shard_threads[shard].submit(self._write_chunk, chunk, nbytes)
            else:  # Redis is slower than we compute: drop rather than queue without bound
                self._finish_writes(chunk, [False] * len(chunk), None, dropped=True)

    # --- on I/O threads -----------------------------------------------------------------------
    def _write(self, chunk: list[_WriteItem]) -> list[bool]:
        """Encode each block and store it; whether each was stored."""
        buffers = self._value_buffers(len(chunk))
        values = [(h, encode_block_into(self.fmt, h, self._slots[slot] if payload is None else payload, out,
                                    self.seal))
                  for (slot, h, payload), out in zip(chunk, buffers)]
        return self.store.put(values)  # returns once sent: the buffers are free again

    def _read(self, chunk: Sequence[tuple[bytes, int]]) -> list[str]:
        """Fetch each block straight into its slot (its header into a small buffer), then verify
        it there; each one's outcome. A slot whose block did not verify holds garbage, which is
        harmless: the driver takes a slot only with a HIT."""
        headers = self._header_buffers(len(chunk))
        destinations = [(memoryview(header), memoryview(self._slots[slot])) for header, (_, slot) in zip(headers, chunk)]
        lengths = self.store.get_into([block_hash for block_hash, _ in chunk], destinations)
        return [check_block(self.fmt, block_hash, header, self._slots[slot], length, self.seal)
                for (block_hash, slot), header, length in zip(chunk, headers, lengths)]

    def _write_chunk(self, chunk: list[_WriteItem], nbytes: int) -> None:
        start = time.perf_counter()
        stored = [False] * len(chunk)
        try:
            stored = self._write(chunk)
        except Exception:  # never lose an outcome: the driver holds the slots until it gets one
            logger.exception("writing %d KV blocks to Redis failed", len(chunk))
        finally:
            with self._cond:
                self._pending_write_bytes -= nbytes
        sample = TransferSample(HOST_TO_REDIS, sum(stored) * self.fmt.nbytes, time.perf_counter() - start)
        self._finish_writes(chunk, stored, sample, dropped=False)
        with self._cond:
            self._writes_in_flight -= 1
            self._cond.notify_all()

    def _header_buffers(self, count: int) -> list[bytearray]:
        buffers = self._local.__dict__.setdefault("headers", [])
        while len(buffers) < count:
            buffers.append(bytearray(self.fmt.header_nbytes))
        return buffers[:count]

    def _value_buffers(self, count: int) -> list[bytearray]:
        # Reused across writes: a fresh multi-MiB value per block costs page faults, which are
        # slow in sandboxed kernels such as the GPU machines' gVisor.
        buffers = self._local.__dict__.setdefault("buffers", [])
        while len(buffers) < count:
            buffers.append(bytearray(self.fmt.header_nbytes + self.fmt.nbytes))
        return buffers[:count]

    def _finish_writes(self, chunk, stored: list[bool], sample: TransferSample | None, dropped: bool) -> None:
        with self._cond:
            done = self._completed
            done.written.extend((slot, ok) for (slot, _, _), ok in zip(chunk, stored) if slot is not None)
            done.stored += sum(stored)
            done.dropped += len(chunk) if dropped else 0
            if sample is not None:
                done.transfers.append(sample)

    def _fetch_chunk(self, chunk: Sequence[tuple[bytes, int]], clock: _BatchClock) -> None:
        outcomes = [MISSING] * len(chunk)
        try:
            outcomes = self._read(chunk)
        except Exception:
            logger.exception("fetching %d KV blocks from Redis failed", len(chunk))
        finally:
            sample = clock.chunk_done(outcomes.count(HIT) * self.fmt.nbytes)
            with self._cond:
                self._completed.fetched.extend((slot, outcome) for (_, slot), outcome in zip(chunk, outcomes))
                if sample is not None:
                    self._completed.transfers.append(sample)
                self._reads_in_flight -= len(chunk)
                self._cond.notify_all()

    def _probe(self, probe_id: int, hashes: Sequence[bytes]) -> None:
        present = (False,) * len(hashes)
        try:
            present = tuple(self.store.contains(hashes))
        except Exception:
            logger.exception("probing %d KV blocks in Redis failed", len(hashes))
        finally:
            with self._cond:
                self._completed.probed.append((probe_id, present))
                self._reads_in_flight -= 1
                self._cond.notify_all()
