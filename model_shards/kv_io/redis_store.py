"""Blocks in Redis: one value per block (or its parts), sharded by hash over several endpoints.

Each entry of `redis_urls` is one shard (model_shards/kv_io/redis_shards.py): a plain server, a
master found through Redis Sentinel, or a whole Redis Cluster (which shards again by key slot
inside). A connection error or timeout marks a shard down, calls to it then fail fast (a miss,
not a wait) until a retry time that backs off exponentially, and the first call after that
reconnects. redis-py's own retries are off, so one dead server costs at most one socket timeout
per backoff period.

Failover needs nothing more. Sentinel: a connection asks the sentinels for the master's address
whenever it (re)connects, so the first call after the backoff reaches the promoted replica; a
connection still open to a demoted master fails (READONLY) and is dropped. Cluster: a failed
call (a node down or hung, MOVED/ASK while slots move) makes the next one reload the slot map
first, so the first call after the backoff goes to the new owner of each slot.

Parts. Redis serves 1-4 MiB values 2-3x faster than 8 MiB ones (its reply buffers, its
allocator), and a Llama-3-8B block of 64 tokens is 8 MiB. So a value much longer than
`part_bytes` is stored as consecutive equal parts of about that size under `<key>`, `<key>:1`,
`<key>:2`, ... on the block's shard, and read back into one buffer. Eviction may take one part and leave the others: the block
is then a miss (its length or checksum no longer matches), never a wrong block. Every block of a
store has the same `value_nbytes`, which fixes how many parts a read asks for.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.retry import Retry

from model_shards.kv_io.namespace import block_key, part_key
from model_shards.kv_io.redis_shards import SHARD_KINDS, Command, Shard, ShardHealth
from model_shards.kv_io.store import Destination
from protocol.redis_urls import parse_redis_url, redact

__all__ = ["RedisBlockStore", "ShardHealth", "redact"]

# The shard cannot answer at all: back off. ClusterDownError is a reply ("CLUSTERDOWN"), but
# no call to that cluster can succeed until it heals; RedisClusterException (not a RedisError)
# is what redis-py raises when no startup node answers while it loads the slot map.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException)


class RedisBlockStore:
    """A BlockStore over Redis servers (model_shards/kv_io/store.py)."""

    def __init__(
        self,
        urls: Sequence[str],
        key_prefix: bytes,
        *,
        ttl_s: int | None = None,
        socket_timeout_s: float = 2.0,
        max_connections: int = 8,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        value_nbytes: int | None = None,
        part_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`value_nbytes`, `part_bytes`: values of that length are stored as equal parts of about
        this size (both None: one value per block, of any length)."""
        if not urls:
            raise ValueError("RedisBlockStore needs at least one URL")
        endpoints = [parse_redis_url(url) for url in urls]  # ValueError naming a bad URL
        # One command, one try: the shard's backoff, not redis-py, decides when to try again.
        # `timeout` is how long a caller waits for a free pooled connection.
        settings = {"max_connections": max_connections, "timeout": socket_timeout_s,
                    "socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s,
                    "retry": Retry(NoBackoff(), 0)}
        self._shards = [
            SHARD_KINDS[endpoint.kind](endpoint, settings, ShardHealth(endpoint.name, backoff_s, backoff_max_s, clock))
            for endpoint in endpoints]
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        # Equal parts, as near `part_bytes` as whole parts get: an 8 MiB block and its header are
        # four parts of 2 MiB and a bit, a 2 MiB block and its header one value.
        self.num_parts = max(1, round(value_nbytes / part_bytes)) if value_nbytes and part_bytes else 1
        self._part_bytes = -(-value_nbytes // self.num_parts) if self.num_parts > 1 else None

    @property
    def up(self) -> bool:
        return all(shard.health.up for shard in self._shards)

    @property
    def errors(self) -> int:
        return sum(shard.health.errors for shard in self._shards)

    def unreachable_shards(self) -> list[str]:
        """The shards marked down by their last call (names carry no password)."""
        return [shard.health.name for shard in self._shards if not shard.health.up]
    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_of(self, block_hash: bytes) -> int:
        """The hash is uniform already: its first 8 bytes pick the shard."""
        return int.from_bytes(block_hash[:8], "little") % len(self._shards)

    def ping(self) -> bool:
        """Reach every shard once; log the unreachable ones. Whether all answered."""
        answers = [self._guarded(shard, shard.ping) is not None for shard in self._shards]  # each, no short cut
        return all(answers)

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        parts = [list(zip(self._keys(h), self._split(value))) for h, value in items]

        def call(shard: Shard, picked: list[int]) -> list[bool]:
            stored = shard.set_values([part for i in picked for part in parts[i]], self._ttl_s)
            return [all(group) for group in _regroup(stored, [len(parts[i]) for i in picked])]

        return self._per_shard_call([h for h, _ in items], False, call)

    def get(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        """Values may be views into buffers reused by the calling thread's next get()."""
        keys = [self._keys(h) for h in hashes]
        return self._per_shard_call(hashes, None, lambda shard, picked: shard.get_values([keys[i] for i in picked]))

    def get_into(self, hashes: Sequence[bytes], destinations: Sequence[Destination]) -> list[int | None]:
        """Values received into their destinations, parts one after the other (BlockStore.get_into)."""
        keys = [self._keys(h) for h in hashes]
        return self._per_shard_call(hashes, None, lambda shard, picked: shard.get_values_into(
            [keys[i] for i in picked], [destinations[i] for i in picked]))

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        """Whether every part of each block is there."""
        return [all(group) for group in self._per_part(hashes, "exists", [0] * self.num_parts)]

    def delete(self, hashes: Sequence[bytes]) -> int:
        """Remove these blocks; how many existed (whole or in part)."""
        return sum(any(group) for group in self._per_part(hashes, "delete", [0] * self.num_parts))

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    # --- plumbing ---------------------------------------------------------------------------
    def _keys(self, block_hash: bytes) -> list[bytes]:
        key = block_key(self._prefix, block_hash)
        return [key] + [part_key(key, index) for index in range(1, self.num_parts)]

    def _split(self, value) -> list:
        if self._part_bytes is None:
            return [value]
        view = memoryview(value).cast("B")  # slices, not copies
        return [view[start : start + self._part_bytes] for start in range(0, len(view), self._part_bytes)]

    def _per_part(self, hashes: Sequence[bytes], command: str, failed_reply: list) -> list[list]:
        """One `command` per part key of each block; the replies grouped by block."""
        def call(shard: Shard, picked: list[int]) -> list[list]:
            commands = [Command(command, key) for i in picked for key in self._keys(hashes[i])]
            return _regroup(shard.execute(commands), [self.num_parts] * len(picked))

        return self._per_shard_call(hashes, failed_reply, call)

    def _per_shard_call(self, hashes: Sequence[bytes], failed_reply, call: Callable[[Shard, list[int]], list]) -> list:
        """call(shard, indices of its hashes) on each shard holding some; replies in the order of
        `hashes`, `failed_reply` where a shard could not answer."""
        replies = [failed_reply] * len(hashes)
        for shard_index, indices in self._group(hashes).items():
            shard = self._shards[shard_index]
            shard_replies = self._guarded(shard, functools.partial(call, shard, indices))
            if shard_replies is not None:
                for i, reply in zip(indices, shard_replies):
                    replies[i] = reply
        return replies

    def _group(self, hashes: Sequence[bytes]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, block_hash in enumerate(hashes):
            groups.setdefault(self.shard_of(block_hash), []).append(i)
        return groups

    @staticmethod
    def _guarded(shard: Shard, call: Callable[[], Any]) -> Any:
        """call() unless the shard is backing off; None where it failed (recorded in its health)."""
        if not shard.health.available():
            return None
        try:
            reply = call()
        except _UNREACHABLE as error:
            shard.health.failed(error, unreachable=True)
            return None
        except redis.RedisError as error:  # e.g. OOM: the server is there but refused
            shard.health.failed(error, unreachable=False)
            return None
        shard.health.succeeded()
        return reply


def _regroup(flat: Sequence, sizes: Sequence[int]) -> list[list]:
    """flat[0:sizes[0]], flat[sizes[0]:sizes[0] + sizes[1]], ..."""
    groups, start = [], 0
    for size in sizes:
        groups.append(list(flat[start : start + size]))
        start += size
    return groups
