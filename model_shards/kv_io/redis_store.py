"""Blocks in Redis: one value per block, sharded by hash over several endpoints, pipelined.

Each entry of `redis_urls` is one shard (protocol/redis_urls.py has the URL forms): a plain
server, a master found through Redis Sentinel, or a whole Redis Cluster (which shards again by
key slot inside). Each shard has blocking connection pools (callers on several threads share
them; a caller waits for a free connection rather than opening unbounded ones) and its own
health: a connection error or timeout marks the shard down, calls to it then fail fast (a miss,
not a wait) until a retry time that backs off exponentially, and the first call after that
reconnects. redis-py's own retries are off, so one dead server costs at most one socket timeout
per backoff period.

Failover needs nothing more. Sentinel: a connection asks the sentinels for the master's address
whenever it (re)connects, so the first call after the backoff reaches the promoted replica; a
connection still open to a demoted master fails (READONLY) and is dropped. Cluster: a failed
call (a node down or hung, MOVED/ASK while slots move) makes the next one reload the slot map
first, so the first call after the backoff goes to the new owner of each slot.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from model_shards.kv_io.namespace import block_key
from model_shards.kv_io.resp import RespPool
from protocol.redis_urls import RedisEndpoint, parse_redis_url, redact

__all__ = ["RedisBlockStore", "ShardHealth", "redact"]

logger = logging.getLogger(__name__)

# The shard cannot answer at all: back off. ClusterDownError is a reply ("CLUSTERDOWN"), but
# no call to that cluster can succeed until it heals; RedisClusterException (not a RedisError)
# is what redis-py raises when no startup node answers while it loads the slot map.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException)


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


class _Command(NamedTuple):
    """One keyed command of a pipeline: pipe.<name>(key, *args, **options)."""

    name: str
    key: bytes
    args: tuple = ()
    options: dict | None = None


def _queue(pipe, commands: Sequence[_Command]) -> None:
    for command in commands:
        getattr(pipe, command.name)(command.key, *command.args, **(command.options or {}))


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels for the master on each connect), blocking when full
    like the pools of the other shards, instead of raising."""


class _Shard:
    """One `redis_urls` entry, here one server: a client made on first use, and its health.

    The client is made lazily because a cluster client loads the slot map in its constructor:
    a cluster down at start must be a failed call (backoff, retried later), not a crash."""

    def __init__(self, endpoint: RedisEndpoint, settings: dict[str, Any], health: ShardHealth):
        self.endpoint = endpoint
        self.health = health
        self._settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def execute(self, commands: Sequence[_Command]) -> list:
        """One pipeline; the replies in order, or an exception."""
        pipe = self.client().pipeline(transaction=False)
        _queue(pipe, commands)
        return pipe.execute()

    def get_values(self, keys: Sequence[bytes]) -> list:
        """Each key's value (bytes-like) or None; valid until this thread's next call."""
        return self.execute([_Command("get", key) for key in keys])

    def set_values(self, items: Sequence[tuple[bytes, Any]], ttl_s: int | None) -> list[bool]:
        return [reply is True for reply in self.execute([_Command("set", k, (v,), {"ex": ttl_s}) for k, v in items])]

    def ping(self) -> bool:
        return bool(self.client().ping())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _connect(self):
        pool = redis.BlockingConnectionPool.from_url(self.endpoint.url, **self._settings)
        return redis.Redis.from_pool(pool)


class _SentinelShard(_Shard):
    """The master of a Sentinel service; its pool asks the sentinels where it is at each connect."""

    def _connect(self):
        endpoint, settings = self.endpoint, self._settings
        sockets = {key: value for key, value in settings.items() if key.startswith("socket_")}
        self._sentinel = Sentinel(
            endpoint.hosts,
            sentinel_kwargs={**sockets, "password": endpoint.sentinel_password, "ssl": endpoint.tls,
                             "retry": settings["retry"]})
        return self._sentinel.master_for(
            endpoint.service, connection_pool_class=_BlockingSentinelPool, db=endpoint.db,
            username=endpoint.username, password=endpoint.password, ssl=endpoint.tls, **settings)

    def close(self) -> None:
        super().close()
        if self._client is not None:
            self._sentinel.close()


class _ClusterShard(_Shard):
    """A Redis Cluster: RedisCluster keeps the slot map and a client per node; each call sends one
    plain pipeline per node owning some of its keys.

    Not redis-py's ClusterPipeline: after a connection error or timeout it resends each failed
    command on its own, each waiting out its own timeout (a pipelined fetch of n blocks held by a
    hung node took n socket timeouts). Here a node that fails fails the whole call at once, and
    the next call first reloads the slot map (a failover or resharding may have moved slots).
    A MOVED or ASK reply fails the call the same way: those blocks are misses this once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reload_slots = False

    def execute(self, commands: Sequence[_Command]) -> list:
        client = self.client()
        if self._reload_slots:
            client.nodes_manager.initialize()
            self._reload_slots = False
        try:
            return self._execute_per_node(client, commands)
        except (redis.RedisError, RedisClusterException):
            self._reload_slots = True
            raise

    def ping(self) -> bool:
        return bool(self.client().ping(target_nodes=RedisCluster.PRIMARIES))

    @staticmethod
    def _execute_per_node(client: RedisCluster, commands: Sequence[_Command]) -> list:
        nodes, positions = {}, {}
        for position, command in enumerate(commands):
            node = client.get_node_from_key(command.key)
            nodes[node.name] = node
            positions.setdefault(node.name, []).append(position)
        replies: list = [None] * len(commands)
        for name, node_positions in positions.items():
            pipe = client.get_redis_connection(nodes[name]).pipeline(transaction=False)
            _queue(pipe, [commands[p] for p in node_positions])
            for position, reply in zip(node_positions, pipe.execute()):
                replies[position] = reply
        return replies

    def _connect(self):
        endpoint, settings = self.endpoint, self._settings
        (host, port), *others = endpoint.hosts
        # The first node goes in as a URL only because redis-py gives the node clients the
        # `connection_pool_class` (blocking, as on the other shards) on that path alone. A call
        # holds one node connection at a time, so blocking pools cannot deadlock here.
        scheme = "rediss" if endpoint.tls else "redis"
        return RedisCluster(
            url=f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}",
            startup_nodes=[ClusterNode(h, p) for h, p in others], username=endpoint.username,
            password=endpoint.password, connection_pool_class=redis.BlockingConnectionPool, **settings)


class _FastServerShard(_Shard):
    """A plain server (no TLS): GET and SET go through model_shards/kv_io/resp.py, received into
    per-thread buffers and sent from memoryviews; other commands through redis-py."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fast = RespPool(self.endpoint.url, self._settings["max_connections"], self._settings["socket_timeout"])
        self._local = threading.local()  # per I/O thread: reused value buffers

    def get_values(self, keys: Sequence[bytes]) -> list:
        buffers: list[bytearray] = self._local.__dict__.setdefault("buffers", [])

        def sink(index: int, length: int) -> memoryview:
            while len(buffers) <= index:
                buffers.append(bytearray())
            if len(buffers[index]) < length:
                buffers[index] = bytearray(length)
            return memoryview(buffers[index])[:length]

        lengths = self._fast.run(lambda connection: connection.get_many(keys, sink))
        return [None if n is None else memoryview(buffers[i])[:n] for i, n in enumerate(lengths)]

    def set_values(self, items: Sequence[tuple[bytes, Any]], ttl_s: int | None) -> list[bool]:
        views = [(key, memoryview(value).cast("B")) for key, value in items]
        return self._fast.run(lambda connection: connection.set_many(views, ttl_s))

    def close(self) -> None:
        super().close()
        self._fast.close()


def _server_shard(endpoint: RedisEndpoint, settings: dict[str, Any], health: ShardHealth) -> _Shard:
    kind = _FastServerShard if RespPool.supports(endpoint.url) else _Shard
    return kind(endpoint, settings, health)


_SHARD_KINDS = {"server": _server_shard, "sentinel": _SentinelShard, "cluster": _ClusterShard}


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
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("RedisBlockStore needs at least one URL")
        endpoints = [parse_redis_url(url) for url in urls]  # ValueError naming a bad URL
        # One command, one try: the shard's backoff, not redis-py, decides when to try again.
        # `timeout` is how long a caller waits for a free pooled connection.
        settings = {"max_connections": max_connections, "timeout": socket_timeout_s,
                    "socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s,
                    "retry": Retry(NoBackoff(), 0)}
        self._shards = [
            _SHARD_KINDS[endpoint.kind](endpoint, settings, ShardHealth(endpoint.name, backoff_s, backoff_max_s, clock))
            for endpoint in endpoints]
        self._prefix = key_prefix
        self._ttl_s = ttl_s

    @property
    def up(self) -> bool:
        return all(shard.health.up for shard in self._shards)

    @property
    def errors(self) -> int:
        return sum(shard.health.errors for shard in self._shards)

    def unreachable_shards(self) -> list[str]:
        """The shards marked down by their last call (names carry no password)."""
        return [shard.health.name for shard in self._shards if not shard.health.up]

    def ping(self) -> bool:
        """Reach every shard once; log the unreachable ones. Whether all answered."""
        answers = [self._guarded(shard, shard.ping) is not None for shard in self._shards]  # each, no short cut
        return all(answers)

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        keyed = [(self._key(h), value) for h, value in items]
        return self._per_shard_call([h for h, _ in items], False,
                                    lambda shard, picked: shard.set_values([keyed[i] for i in picked], self._ttl_s))

    def get(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        """Values may be views into buffers reused by the calling thread's next get()."""
        keys = [self._key(h) for h in hashes]
        return self._per_shard_call(hashes, None, lambda shard, picked: shard.get_values([keys[i] for i in picked]))

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        return [bool(n) for n in self._per_shard(hashes, [_Command("exists", self._key(h)) for h in hashes], 0)]

    def delete(self, hashes: Sequence[bytes]) -> int:
        return sum(self._per_shard(hashes, [_Command("delete", self._key(h)) for h in hashes], 0))

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    # --- plumbing ---------------------------------------------------------------------------
    def _key(self, block_hash: bytes) -> bytes:
        return block_key(self._prefix, block_hash)

    def _per_shard(self, hashes: Sequence[bytes], commands: list[_Command], failed_reply) -> list:
        """Run each shard's commands (one pipeline per server); replies in the order of `hashes`,
        `failed_reply` where a shard could not answer."""
        return self._per_shard_call(hashes, failed_reply,
                                    lambda shard, picked: shard.execute([commands[i] for i in picked]))

    def _per_shard_call(self, hashes: Sequence[bytes], failed_reply, call: Callable[[_Shard, list[int]], list]) -> list:
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
        # The hash is uniform already: its first 8 bytes pick the shard.
        groups: dict[int, list[int]] = {}
        for i, block_hash in enumerate(hashes):
            groups.setdefault(int.from_bytes(block_hash[:8], "little") % len(self._shards), []).append(i)
        return groups

    @staticmethod
    def _guarded(shard: _Shard, call: Callable[[], Any]) -> Any:
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
