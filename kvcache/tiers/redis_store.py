"""Blocks in Redis: one value per block, sharded by hash over several servers, pipelined.

Each shard has a blocking connection pool (callers on several threads share it; a caller waits
for a free connection rather than opening unbounded ones) and its own health: a connection
error or timeout marks the shard down, calls to it then fail fast (a miss, not a wait) until a
retry time that backs off exponentially, and the first call after that reconnects. redis-py's
own retries are off, so one dead server costs at most one socket timeout per backoff period.
Sentinel and Cluster URLs are not supported (future work): shard over plain servers instead.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcache.tiers.namespace import block_key

logger = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or parts.path
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


class ShardHealth:
    """Up/down state of one shard with exponential backoff; thread-safe."""

    def __init__(self, name: str, backoff_s: float, backoff_max_s: float, clock: Callable[[], float]):
        self.name = name
        self.errors = 0
        self._initial_s, self._max_s, self._clock = backoff_s, backoff_max_s, clock
        self._wait_s = backoff_s
        self._retry_at = 0.0
        self._up = True
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self._up

    def available(self) -> bool:
        return self._up or self._clock() >= self._retry_at

    def succeeded(self) -> None:
        if self._up:
            return
        with self._lock:
            if not self._up:
                logger.warning("Redis shard %s is reachable again", self.name)
            self._up, self._wait_s = True, self._initial_s

    def failed(self, error: Exception, *, unreachable: bool) -> None:
        with self._lock:
            self.errors += 1
            if not unreachable:
                return
            if self._up:
                logger.warning("Redis shard %s failed (%s); blocks there are misses, retrying in %.1f s",
                               self.name, error, self._wait_s)
            self._up = False
            self._retry_at = self._clock() + self._wait_s
            self._wait_s = min(2 * self._wait_s, self._max_s)


class _Shard:
    def __init__(self, url: str, settings: dict[str, Any], health: ShardHealth):
        self.pool = redis.BlockingConnectionPool.from_url(url, **settings)
        self.client = redis.Redis(connection_pool=self.pool)
        self.health = health


class RedisBlockStore:
    """A BlockStore over Redis servers (kvcache/tiers/store.py)."""

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
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("RedisBlockStore needs at least one URL")
        settings = {"max_connections": max_connections, "timeout": socket_timeout_s,
                    "socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s,
                    "retry": Retry(NoBackoff(), 0)}
        self._shards = [_Shard(url, settings, ShardHealth(redact(url), backoff_s, backoff_max_s, clock))
                        for url in urls]
        self._prefix = key_prefix
        self._ttl_s = ttl_s

    @property
    def up(self) -> bool:
        return all(shard.health.up for shard in self._shards)

    @property
    def errors(self) -> int:
        return sum(shard.health.errors for shard in self._shards)

    def ping(self) -> bool:
        """Reach every shard once; log the unreachable ones. Whether all answered."""
        return all(self._run(shard, lambda pipe: pipe.ping()) is not None for shard in self._shards)

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        def build(pipe, indices):
            for i in indices:
                pipe.set(block_key(self._prefix, items[i][0]), items[i][1], ex=self._ttl_s)

        return [reply is True for reply in self._per_shard([h for h, _ in items], build, False)]

    def get(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        return self._per_shard(hashes, self._command("get", hashes), None)

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        return [bool(n) for n in self._per_shard(hashes, self._command("exists", hashes), 0)]

    def delete(self, hashes: Sequence[bytes]) -> int:
        return sum(self._per_shard(hashes, self._command("delete", hashes), 0))

    def close(self) -> None:
        for shard in self._shards:
            shard.pool.disconnect()

    # --- plumbing ---------------------------------------------------------------------------
    def _command(self, name: str, hashes: Sequence[bytes]):
        def build(pipe, indices):
            for i in indices:
                getattr(pipe, name)(block_key(self._prefix, hashes[i]))

        return build

    def _per_shard(self, hashes: Sequence[bytes], build, failed_reply) -> list:
        """Run one pipeline per shard; replies in the order of `hashes`, `failed_reply` where a
        shard could not answer."""
        replies = [failed_reply] * len(hashes)
        for shard_index, indices in self._group(hashes).items():
            shard_replies = self._run(self._shards[shard_index], functools.partial(build, indices=indices))
            if shard_replies is not None:
                for i, reply in zip(indices, shard_replies):
                    replies[i] = reply
        return replies

    def _group(self, hashes: Sequence[bytes]) -> dict[int, list[int]]:
        # The hash is uniform already: its first 8 bytes pick the shard.
        groups: dict[int, list[int]] = {}
        for i, block_hash in enumerate(hashes):
            groups.setdefault(int.from_bytes(block_hash[:8], "little") % len(self._shards), []).append(i)
        return groups

    @staticmethod
    def _run(shard: _Shard, build) -> list | None:
        if not shard.health.available():
            return None
        try:
            pipe = shard.client.pipeline(transaction=False)
            build(pipe)
            replies = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            shard.health.failed(error, unreachable=True)
            return None
        except redis.RedisError as error:  # e.g. OOM: the server is there but refused
            shard.health.failed(error, unreachable=False)
            return None
        shard.health.succeeded()
        return replies
