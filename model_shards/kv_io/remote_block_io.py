"""Blocks between the worker's host slots and a remote BlockStore (Redis), on background threads.

The worker's step only submits: a write-back copies its slot first (the driver reuses the slot
at once), a write-through and a fetch touch their slot later on an I/O thread (the driver holds
those slots until they come back in a report). Values are encoded, checksummed and verified on
the I/O threads (`model_shards/kv_io/codec.py`; crc32 and the copies release the GIL), so nothing in
the step waits on Redis. Every submitted fetch and write-through produces exactly one outcome,
whatever fails, because the driver frees its slot only then.

Torch-free: the host slots arrive as a (num_slots, block bytes) uint8 numpy view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block_into
from model_shards.kv_io.store import BlockStore
from protocol.kv_transfer_ops import (
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


class RemoteBlockIO:
    def __init__(self, store: BlockStore, fmt: BlockFormat, slots: np.ndarray, *, threads: int,
                 max_pending_write_bytes: int, health_check_period_s: float = 5.0):
        self.store = store
        self.fmt = fmt
        self._slots = slots  # (num_slots, fmt.nbytes) uint8, a view of the host pool
        self._pipeline_blocks = max(1, _PIPELINE_BYTES // fmt.nbytes)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kv-redis")
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
        chunks = [items[i : i + self._pipeline_blocks] for i in range(0, len(items), self._pipeline_blocks)]
        clock = _BatchClock(REDIS_TO_HOST, len(chunks))
        with self._cond:
            self._reads_in_flight += len(items)
        for chunk in chunks:
            self._executor.submit(self._fetch_chunk, chunk, clock)

    def probe(self, items: Sequence[tuple[int, Sequence[bytes]]]) -> None:
        """(probe id, hashes): which of the hashes the store holds; each comes back in `probed`."""
        with self._cond:
            self._reads_in_flight += len(items)
        for probe_id, hashes in items:
            self._executor.submit(self._probe, probe_id, hashes)

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
        self._executor.submit(self._ping)

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
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def _submit_writes(self, items: list[tuple[int | None, bytes, np.ndarray | None]]) -> None:
        for start in range(0, len(items), self._pipeline_blocks):
            chunk = items[start : start + self._pipeline_blocks]
            nbytes = len(chunk) * self.fmt.nbytes
            with self._cond:
                admitted = self._pending_write_bytes + nbytes <= self._max_pending_write_bytes
                self._pending_write_bytes += nbytes if admitted else 0
                self._writes_in_flight += 1 if admitted else 0
            if admitted:
                self._executor.submit(self._write_chunk, chunk, nbytes)
            else:  # Redis is slower than we compute: drop rather than queue without bound
                self._finish_writes(chunk, [False] * len(chunk), None, dropped=True)

    # --- on I/O threads -----------------------------------------------------------------------
    def _write_chunk(self, chunk: list[tuple[int | None, bytes, np.ndarray | None]], nbytes: int) -> None:
        start = time.perf_counter()
        stored = [False] * len(chunk)
        try:
            buffers = self._value_buffers(len(chunk))
            values = [(h, encode_block_into(self.fmt, h, self._slots[slot] if payload is None else payload, out))
                      for (slot, h, payload), out in zip(chunk, buffers)]
            stored = self.store.put(values)  # returns once sent: the buffers are free again
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
        nbytes = 0
        try:
            values = self.store.get([block_hash for block_hash, _ in chunk])
            for index, ((block_hash, slot), value) in enumerate(zip(chunk, values)):
                outcome, payload = decode_block(self.fmt, block_hash, value)
                if payload is not None:
                    self._slots[slot] = np.frombuffer(payload, dtype=np.uint8)
                    nbytes += payload.nbytes
                outcomes[index] = outcome  # only after the copy: a failed copy stays a miss
        except Exception:
            logger.exception("fetching %d KV blocks from Redis failed", len(chunk))
        finally:
            sample = clock.chunk_done(nbytes)
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
