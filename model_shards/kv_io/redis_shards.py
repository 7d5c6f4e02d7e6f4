"""The shards of the Redis block store: one per `redis_urls` entry, each with its own health.

A shard is a plain server, a master found through Redis Sentinel, or a whole Redis Cluster
(protocol/redis_urls.py has the URL forms). Each has blocking connection pools (callers on several
threads share them; a caller waits for a free connection rather than opening unbounded ones) and
its own health: a connection error or timeout marks it down, calls to it then fail fast (a miss,
not a wait) until a retry time that backs off exponentially (`RedisBlockStore` guards each call).

Values are read per *group* of keys: a block stored as parts (model_shards/kv_io/redis_store.py)
is one group, its parts concatenated in order into one value, or None if any part is missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel, SentinelConnectionPool

from model_shards.kv_io.resp import RespPool
from model_shards.kv_io.store import OTHER_LENGTH, Destination, copy_into, destination_nbytes
from protocol.redis_urls import RedisEndpoint

logger = logging.getLogger(__name__)


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


class Command(NamedTuple):
    """One keyed command of a pipeline: pipe.<name>(key, *args, **options)."""

    name: str
    key: bytes
    args: tuple = ()
    options: dict | None = None


def _queue(pipe, commands: Sequence[Command]) -> None:
    for command in commands:
        getattr(pipe, command.name)(command.key, *command.args, **(command.options or {}))


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels for the master on each connect), blocking when full
    like the pools of the other shards, instead of raising."""


class Shard:
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

    def execute(self, commands: Sequence[Command]) -> list:
        """One pipeline; the replies in order, or an exception."""
        pipe = self.client().pipeline(transaction=False)
        _queue(pipe, commands)
        return pipe.execute()

    def get_values(self, key_groups: Sequence[Sequence[bytes]]) -> list:
        """Each group's values concatenated (bytes-like), or None if one is missing; valid until
        this thread's next call."""
        flat = self.execute([Command("get", key) for keys in key_groups for key in keys])
        values, start = [], 0
        for keys in key_groups:
            parts, start = flat[start : start + len(keys)], start + len(keys)
            values.append(None if any(part is None for part in parts) else b"".join(parts))
        return values

    def get_values_into(self, key_groups: Sequence[Sequence[bytes]], destinations: Sequence[Destination]
                        ) -> list[int | None]:
        """Each group's values concatenated into its destination (BlockStore.get_into's answers)."""
        return [copy_into(value, destination)
                for value, destination in zip(self.get_values(key_groups), destinations)]

    def set_values(self, items: Sequence[tuple[bytes, Any]], ttl_s: int | None) -> list[bool]:
        return [reply is True for reply in self.execute([Command("set", k, (v,), {"ex": ttl_s}) for k, v in items])]

    def ping(self) -> bool:
        return bool(self.client().ping())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _connect(self):
        pool = redis.BlockingConnectionPool.from_url(self.endpoint.url, **self._settings)
        return redis.Redis.from_pool(pool)


class _SentinelShard(Shard):
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


class _ClusterShard(Shard):
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

    def execute(self, commands: Sequence[Command]) -> list:
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
    def _execute_per_node(client: RedisCluster, commands: Sequence[Command]) -> list:
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


class _FastServerShard(Shard):
    """A plain server (no TLS): GET and SET go through model_shards/kv_io/resp.py, received into
    per-thread buffers and sent from memoryviews; other commands through redis-py."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fast = RespPool(self.endpoint.url, self._settings["max_connections"], self._settings["socket_timeout"])
        self._local = threading.local()  # per I/O thread: reused value buffers

    def get_values(self, key_groups: Sequence[Sequence[bytes]]) -> list:
        """Each group's parts are received one after the other into one reused buffer: a value
        split into parts costs no extra copy."""
        buffers: list[bytearray] = self._local.__dict__.setdefault("buffers", [])
        while len(buffers) < len(key_groups):
            buffers.append(bytearray())
        group_of = [group for group, keys in enumerate(key_groups) for _ in keys]
        filled = [0] * len(key_groups)

        def sink(index: int, length: int) -> memoryview:
            group, start = group_of[index], filled[group_of[index]]
            if len(buffers[group]) < start + length:
                buffers[group] = buffers[group][:start] + bytearray(start + length - start)
            filled[group] = start + length
            return memoryview(buffers[group])[start : start + length]

        flat = [key for keys in key_groups for key in keys]
        lengths = self._fast.run(lambda connection: connection.get_many(flat, sink))
        missing = {group_of[index] for index, length in enumerate(lengths) if length is None}
        return [None if group in missing else memoryview(buffers[group])[: filled[group]]
                for group in range(len(key_groups))]

    def get_values_into(self, key_groups: Sequence[Sequence[bytes]], destinations: Sequence[Destination]
                        ) -> list[int | None]:
        """Each group's parts received straight into its destination (no copy after), in order;
        a value longer than its destination goes to a scratch buffer instead (OTHER_LENGTH)."""
        group_of = [group for group, keys in enumerate(key_groups) for _ in keys]
        filled = [0] * len(key_groups)
        other_length: set[int] = set()

        def sink(index: int, length: int) -> Sequence[memoryview]:
            group = group_of[index]
            start, filled[group] = filled[group], filled[group] + length
            views = _slice(destinations[group], start, length)
            if views is None:
                other_length.add(group)
                return [self._scratch(length)]
            return views

        flat = [key for keys in key_groups for key in keys]
        lengths = self._fast.run(lambda connection: connection.get_many(flat, sink))
        missing = {group_of[index] for index, length in enumerate(lengths) if length is None}
        return [None if group in missing else filled[group] if group not in other_length
                and filled[group] == destination_nbytes(destinations[group]) else OTHER_LENGTH
                for group in range(len(key_groups))]

    def _scratch(self, nbytes: int) -> memoryview:
        buffer = self._local.__dict__.get("scratch")
        if buffer is None or len(buffer) < nbytes:
            buffer = self._local.scratch = bytearray(nbytes)
        return memoryview(buffer)[:nbytes]

    def set_values(self, items: Sequence[tuple[bytes, Any]], ttl_s: int | None) -> list[bool]:
        views = [(key, memoryview(value).cast("B")) for key, value in items]
        return self._fast.run(lambda connection: connection.set_many(views, ttl_s))

    def close(self) -> None:
        super().close()
        self._fast.close()


def _slice(destination: Destination, start: int, length: int) -> list[memoryview] | None:
    """The pieces of `destination` (views, one after the other) that bytes [start, start +
    length) of it fall in; None when they run past its end."""
    pieces, offset = [], 0
    for view in destination:
        low, high = max(start, offset), min(start + length, offset + view.nbytes)
        if low < high:
            pieces.append(view[low - offset : high - offset])
        offset += view.nbytes
    return pieces if start + length <= offset else None


def _server_shard(endpoint: RedisEndpoint, settings: dict[str, Any], health: ShardHealth) -> Shard:
    kind = _FastServerShard if RespPool.supports(endpoint.url) else Shard
    return kind(endpoint, settings, health)


SHARD_KINDS = {"server": _server_shard, "sentinel": _SentinelShard, "cluster": _ClusterShard}
