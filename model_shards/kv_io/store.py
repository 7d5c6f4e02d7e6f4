"""The interface of a remote block store, and an in-memory one for tests and benchmarks.

A store maps block hashes to encoded block values (`model_shards/kv_io/codec.py`). Every call is
batched; calls are synchronous and thread-safe: callers that must not wait (the worker's step)
run them on background threads (`model_shards/kv_io/remote_block_io.py`). A store never raises for an
unreachable backend: an unreadable value is a miss, an unwritten one is reported as not stored,
and `errors` counts the failures.

The device and host tiers are not stores: their contents are indexed by hash in the driver
(`kvcache/block_pool.py` for device blocks, `kvcache/tiers/host_index.py` for host slots), so
that lookups never leave the driver; the worker moves their bytes by block id and slot.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

# Where one value's bytes go, in order: e.g. a small buffer for its header, then the host slot
# itself for its payload (received there, not copied there).
Destination = Sequence[memoryview]
OTHER_LENGTH = -1  # get_into: the value exists but is not as long as its destination: not received


def destination_nbytes(destination: Destination) -> int:
    return sum(view.nbytes for view in destination)


def copy_into(value, destination: Destination) -> int | None:
    """Copy a value into its destination when their lengths agree: get_into's answer for it."""
    if value is None:
        return None
    view = memoryview(value).cast("B")
    if view.nbytes != destination_nbytes(destination):
        return OTHER_LENGTH
    offset = 0
    for piece in destination:
        piece[:] = view[offset : offset + piece.nbytes]
        offset += piece.nbytes
    return view.nbytes


class BlockStore(Protocol):
    @property
    def up(self) -> bool:
        """Whether the last call reached the backend (False: calls fail fast until a retry)."""

    @property
    def errors(self) -> int:
        """Failed backend calls so far."""

    @property
    def num_shards(self) -> int:
        """Independent backends (Redis servers): transfers to different ones run in parallel."""

    def shard_of(self, block_hash: bytes) -> int:
        """The shard holding this block, in [0, num_shards)."""

    def ping(self) -> bool:
        """Reach the backend (once its backoff allows); whether it answered."""

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Store (hash, value) pairs; whether each was stored."""

    def get(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        """The value of each hash, or None (absent or unreachable)."""

    def get_into(self, hashes: Sequence[bytes], destinations: Sequence[Destination]) -> list[int | None]:
        """Each hash's value received into its destination: its length, None (absent or
        unreachable) or OTHER_LENGTH (a value of another length, not received; the
        destination may hold part of it)."""

    def contains(self, hashes: Sequence[bytes]) -> list[bool]: ...

    def delete(self, hashes: Sequence[bytes]) -> int:
        """Remove these blocks; how many existed."""

    def close(self) -> None: ...


class MemoryBlockStore:
    """A dict behind the BlockStore interface: one process, no expiry, no eviction."""

    def __init__(self) -> None:
        self._values: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self.up = True
        self.errors = 0
        self.num_shards = 1

    def shard_of(self, block_hash: bytes) -> int:
        return 0

    def ping(self) -> bool:
        return True

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        with self._lock:
            self._values.update(items)
        return [True] * len(items)

    def get(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            return [self._values.get(h) for h in hashes]

    def get_into(self, hashes: Sequence[bytes], destinations: Sequence[Destination]) -> list[int | None]:
        return [copy_into(value, destination) for value, destination in zip(self.get(hashes), destinations)]

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [h in self._values for h in hashes]

    def delete(self, hashes: Sequence[bytes]) -> int:
        with self._lock:
            return sum(self._values.pop(h, None) is not None for h in hashes)

    def close(self) -> None:
        pass
