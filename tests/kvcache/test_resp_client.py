"""The raw RESP path of the Redis block store (model_shards/kv_io/resp.py) against a real redis-server:
exact values of every size, order, absent keys, TTL, AUTH and SELECT, error replies, threads; and
against a fake server that trickles or stalls a value."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from model_shards.kv_io.redis_store import RedisBlockStore
from model_shards.kv_io.resp import RespPool
from model_shards.kv_io.store import OTHER_LENGTH

PREFIX = b"resp-test:"


def values_of_many_sizes(rng: random.Random) -> list[tuple[bytes, bytes]]:
    """Sizes around the 64 KiB read buffer, several small replies per read, and a few MiB."""
    sizes = [0, 1, 100, 65_533, 65_536, 65_539, 3 << 20, 17, 200_000]
    return [(rng.randbytes(32), os.urandom(size)) for size in sizes]


def test_values_of_every_size_come_back_exact_in_order(redis_server):
    store = RedisBlockStore([redis_server.url], PREFIX, ttl_s=600)
    items = values_of_many_sizes(random.Random(0))
    assert store.put([(h, memoryview(v)) for h, v in items]) == [True] * len(items)
    absent = random.Random(1).randbytes(32)
    hashes = [absent] + [h for h, _ in items][::-1]
    values = store.get(hashes)
    assert values[0] is None
    assert [bytes(v) for v in values[1:]] == [v for _, v in items][::-1]
    client = redis_server.client()
    assert 0 < client.ttl(PREFIX + items[0][0].hex().encode()) <= 600


def test_auth_and_database_come_from_the_url(redis_server):
    client = redis_server.client()
    client.config_set("requirepass", "s3cret")
    store = RedisBlockStore([f"redis://:s3cret@127.0.0.1:{redis_server.port}/3"], PREFIX)
    block_hash = b"\x01" * 32
    assert store.put([(block_hash, b"payload")]) == [True]
    assert bytes(store.get([block_hash])[0]) == b"payload"
    import redis

    in_db3 = redis.Redis(port=redis_server.port, password="s3cret", db=3)
    assert in_db3.get(PREFIX + block_hash.hex().encode()) == b"payload"
    wrong = RedisBlockStore([f"redis://:wrong@127.0.0.1:{redis_server.port}/3"], PREFIX)
    assert wrong.put([(block_hash, b"x")]) == [False] and wrong.get([block_hash]) == [None]
    assert not wrong.up and wrong.errors == 1  # a failed connection: the shard backs off


def test_an_error_reply_fails_that_write_only(redis_server):
    client = redis_server.client()
    store = RedisBlockStore([redis_server.url], PREFIX)
    assert store.put([(b"\x02" * 32, b"kept")]) == [True]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + (1 << 20))
    stored = store.put([(bytes([i]) * 32, os.urandom(1 << 20)) for i in range(10, 14)])
    assert not all(stored)  # OOM error replies, each read off the connection
    assert store.up  # the server answered: not a reason to back off
    client.config_set("maxmemory", 0)
    assert store.put([(b"\x03" * 32, b"later")]) == [True]  # the same connection, still in step
    assert [bytes(v) for v in store.get([b"\x02" * 32, b"\x03" * 32])] == [b"kept", b"later"]


def test_threads_read_their_own_values(redis_server):
    store = RedisBlockStore([redis_server.url], PREFIX, max_connections=4)
    items = [(random.Random(i).randbytes(32), os.urandom(300_000 + i)) for i in range(32)]
    assert all(store.put(items))
    expected = dict(items)

    def read(chunk):  # values are views into the thread's buffers: compare before the next get
        return all(bytes(value) == expected[h] for h, value in zip(chunk, store.get(chunk)))

    chunks = [[h for h, _ in items[i::4]] for i in range(4)] * 5
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, chunks))


@pytest.mark.parametrize("url, fast", [("redis://h:1/0", True), ("unix:///tmp/r.sock", True),
                                       ("rediss://h:1/0", False)])
def test_tls_stays_on_redis_py(url, fast):
    assert RespPool.supports(url) is fast


def test_after_a_restart_one_failure_flushes_every_stale_connection(start_redis):
    server = start_redis()
    store = RedisBlockStore([server.url], PREFIX, max_connections=4, backoff_s=0.05, backoff_max_s=0.05)
    block_hash = b"\x04" * 32
    assert store.put([(block_hash, b"v")]) == [True]
    with ThreadPoolExecutor(4) as pool:  # four idle connections in the pool
        assert all(pool.map(lambda _: store.get([block_hash])[0] is not None, range(16)))
    server.kill()
    start_redis(server.port)  # same address, empty, every old connection dead
    assert store.get([block_hash]) == [None] and store.errors == 1  # one failure: the shard backs off
    import time

    time.sleep(0.1)
    with ThreadPoolExecutor(4) as pool:  # every pooled connection is taken again
        assert all(pool.map(lambda _: store.put([(block_hash, b"again")]) == [True], range(16)))
    assert store.errors == 1 and store.up  # no stale connection failed a second time


class TricklingServer:
    """A fake Redis on a free port that answers any GET with `reply`, sent in `pieces` with
    `pause_s` between them (a server that stalls mid-value when pause_s is long)."""

    def __init__(self, reply: bytes, pieces: int, pause_s: float):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, args=(reply, pieces, pause_s), daemon=True)
        self.thread.start()

    def _serve(self, reply: bytes, pieces: int, pause_s: float) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(1 << 16)  # the GET
            size = -(-len(reply) // pieces)
            for start in range(0, len(reply), size):
                connection.sendall(reply[start : start + size])
                time.sleep(pause_s)
            time.sleep(3.0)  # hold the connection open: the client decides when it has waited enough

    def close(self) -> None:
        self.listener.close()


def test_a_value_that_arrives_in_pieces_is_received_whole():
    """The rest of a value is one MSG_WAITALL receive: the kernel fills it across the server's writes."""
    value = os.urandom(1 << 20)
    server = TricklingServer(b"$%d\r\n%s\r\n" % (len(value), value), pieces=16, pause_s=0.005)
    pool = RespPool(server.url, max_connections=1, timeout_s=2.0)
    buffer = bytearray(len(value))
    lengths = pool.run(lambda connection: connection.get_many([b"k"], lambda index, length: memoryview(buffer)))
    assert lengths == [len(value)] and bytes(buffer) == value
    pool.close()
    server.close()


def test_a_server_stalling_mid_value_times_out_within_the_socket_timeout():
    """The timeout lives in the kernel (SO_RCVTIMEO): a stalled value still fails, as a redis-py timeout."""
    value = os.urandom(1 << 20)
    server = TricklingServer(b"$%d\r\n%s" % (len(value), value[: 1 << 16]), pieces=1, pause_s=0.0)
    pool = RespPool(server.url, max_connections=1, timeout_s=0.3)
    buffer = bytearray(len(value))
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        pool.run(lambda connection: connection.get_many([b"k"], lambda index, length: memoryview(buffer)))
    assert 0.25 < time.monotonic() - started < 2.0  # at most two timeouts (one partial receive), on a busy VM
    pool.close()
    server.close()


@pytest.mark.parametrize("part_bytes", [None, 1 << 20])
def test_values_are_received_straight_into_their_destinations_parts_and_all(redis_server, part_bytes):
    """get_into: a header buffer then the slot itself, filled in place across the parts; a value
    of another length is not received (OTHER_LENGTH), an absent one is None."""
    header_nbytes, payload_nbytes = 100, (3 << 20) + 7
    store = RedisBlockStore([redis_server.url], PREFIX, value_nbytes=header_nbytes + payload_nbytes,
                            part_bytes=part_bytes)
    rng = random.Random(3)
    good, short, absent = (rng.randbytes(32) for _ in range(3))
    value = os.urandom(header_nbytes + payload_nbytes)
    assert store.put([(good, memoryview(value)), (short, memoryview(value[:-1]))]) == [True, True]
    destinations = [(memoryview(bytearray(header_nbytes)), memoryview(bytearray(payload_nbytes))) for _ in range(3)]
    lengths = store.get_into([good, short, absent], destinations)
    assert lengths == [len(value), OTHER_LENGTH, None]
    header, payload = destinations[0]
    assert bytes(header) + bytes(payload) == value
    assert store.num_parts == (1 if part_bytes is None else 3)
