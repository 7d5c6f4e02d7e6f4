"""The Redis tier over Sentinel and Cluster, against real servers started here on free ports.

Blocks are real values (model_shards/kv_io/codec.py) with random payloads, compared bit for bit.
Sentinel: a master, one replica and one sentinel with short timeouts; the master is killed and
the store must find the promoted replica by itself. Cluster: three masters, no replicas.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time

import pytest
from redis.crc import key_slot

from cluster.cli import _split_urls
from cluster.config import KVTierSettings
from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block
from model_shards.kv_io.namespace import block_key, key_namespace, key_prefix
from model_shards.kv_io.redis_store import RedisBlockStore
from protocol.kv_transfer_ops import HIT, MISSING
from protocol.redis_urls import parse_redis_url, redact

PREFIX = key_prefix("test", key_namespace("fingerprint", "checkpoint"))
FMT = BlockFormat("float16", (2, 2, 16, 2, 8), 2 * 2 * 16 * 2 * 8 * 2)  # 2 KiB payloads
SERVICE = "kvtier"
REDIS_CLI = shutil.which("redis-cli")


def make_blocks(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    """(hash, encoded value) pairs with random payloads: every bit pattern, distinct hashes."""
    rng = random.Random(seed)
    hashes = [rng.randbytes(32) for _ in range(n)]
    return [(h, encode_block(FMT, h, rng.randbytes(FMT.nbytes))) for h in hashes]


def assert_bit_exact(store: RedisBlockStore, blocks: list[tuple[bytes, bytes]]) -> None:
    values = store.get([h for h, _ in blocks])
    assert values == [v for _, v in blocks]
    for (block_hash, value), fetched in zip(blocks, values):
        outcome, payload = decode_block(FMT, block_hash, fetched)
        assert outcome == HIT and bytes(payload) == value[-FMT.nbytes:]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() held; fails the test after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


# --- URL forms (no servers) ------------------------------------------------------------------
def test_sentinel_and_cluster_urls_parse_into_hosts_service_and_credentials():
    sentinel = parse_redis_url("rediss+sentinel://u:p%40ss@s1:26380,s2/mymaster/3?sentinel_password=sp")
    assert (sentinel.kind, sentinel.hosts, sentinel.service, sentinel.db) == (
        "sentinel", (("s1", 26380), ("s2", 26379)), "mymaster", 3)
    assert (sentinel.username, sentinel.password, sentinel.sentinel_password, sentinel.tls) == ("u", "p@ss", "sp", True)
    cluster = parse_redis_url("redis+cluster://:pw@n1:7000,[::1]:7001,n3")
    assert (cluster.kind, cluster.hosts, cluster.password, cluster.tls) == (
        "cluster", (("n1", 7000), ("::1", 7001), ("n3", 6379)), "pw", False)
    server = parse_redis_url("rediss://:pw@h:6380/2")
    assert (server.kind, server.password, server.tls) == ("server", "pw", True)
    assert redact(sentinel.url) == "rediss+sentinel://s1:26380,s2/mymaster"
    assert redact(cluster.url) == "redis+cluster://n1:7000,[::1]:7001,n3"
    assert redact("redis://:pa/ss@h:1/0") == "redis://h:1"  # an unescaped "/" in a password


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://:secret@s1:26379", "service name"),
    ("redis+sentinel://:secret@s1:26379/m?sentinel_pasword=x", "unknown option"),
    ("redis+cluster://:secret@n1:7000/1", "database 0 only"),
    ("redis+cluster://:secret@n1:70000", "port"),
    ("redis://:secret@a:1,b:2", "one host only"),
    ("http://:secret@a:1", "scheme"),
])
def test_a_bad_url_is_a_value_error_naming_it_without_the_password(url, reason):
    for make in (parse_redis_url, lambda u: RedisBlockStore([u], PREFIX),
                 lambda u: KVTierSettings(host_bytes=1, redis_urls=(u,))):
        with pytest.raises(ValueError, match=reason) as error:
            make(url)
        assert redact(url) in str(error.value) and "secret" not in str(error.value)


def test_the_cli_keeps_the_hosts_of_one_sentinel_or_cluster_url_together():
    assert _split_urls(["redis://a:1,redis+sentinel://:p@s1:1,s2:2/m", "redis+cluster://n1,n2:3,rediss://b"]) == (
        "redis://a:1", "redis+sentinel://:p@s1:1,s2:2/m", "redis+cluster://n1,n2:3", "rediss://b")
    assert _split_urls(["redis+cluster://n1, n2,", "n3:1"]) == ("redis+cluster://n1,n2", "n3:1")  # per flag


def test_sentinel_and_cluster_down_at_start_are_fast_misses_not_errors(free_tcp_port):
    store = RedisBlockStore([f"redis+sentinel://127.0.0.1:{free_tcp_port}/{SERVICE}",
                             f"redis+cluster://127.0.0.1:{free_tcp_port}"], PREFIX, socket_timeout_s=0.5)
    start = time.monotonic()
    assert not store.ping() and not store.up and store.errors == 2
    blocks = make_blocks(8, seed=0)
    assert store.put(blocks) == [False] * 8 and store.get([h for h, _ in blocks]) == [None] * 8
    assert time.monotonic() - start < 2.0 and store.errors == 2  # backing off: no new attempts
    store.close()


# --- Sentinel ---------------------------------------------------------------------------------
@pytest.fixture
def sentinel_setup(start_redis, tmp_path):
    """(master, replica, sentinel) with the replica in sync and known to the sentinel."""
    master = start_redis(args=["--repl-diskless-sync-delay", "0"])  # the default waits 5 s for more replicas
    replica = start_redis(args=["--replicaof", "127.0.0.1", str(master.port)])
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", 10, "replica sync")
    config = tmp_path / "sentinel.conf"
    # Short timeouts: the master counts as down after 300 ms; one sentinel is a quorum of one.
    config.write_text(f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1\n"
                      f"sentinel down-after-milliseconds {SERVICE} 300\n"
                      f"sentinel failover-timeout {SERVICE} 2000\n")
    sentinel = start_redis(args=["--sentinel"], config=config)
    wait_until(lambda: sentinel.client().sentinel_master(SERVICE)["num-slaves"] == 1, 15, "sentinel sees the replica")
    return master, replica, sentinel


def test_sentinel_round_trip_survives_a_failover_to_the_replica(sentinel_setup):
    master, replica, sentinel = sentinel_setup
    store = RedisBlockStore([f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"], PREFIX,
                            socket_timeout_s=0.5, backoff_s=0.1, backoff_max_s=0.5)
    before = make_blocks(64, seed=1)
    assert store.put(before) == [True] * 64
    assert_bit_exact(store, before)
    assert master.client().dbsize() == 64
    assert master.client().wait(1, 5000) == 1  # the replica has them all before the master dies

    master.kill()
    assert store.get([before[0][0]]) == [None] and not store.up  # a miss, not an exception
    after = make_blocks(16, seed=2)
    recovered_s = wait_until(lambda: store.put(after) == [True] * 16, 20, "writes after the failover")
    assert store.up and recovered_s < 20
    assert sentinel.client().sentinel_get_master_addr_by_name(SERVICE) == (b"127.0.0.1", replica.port)
    assert_bit_exact(store, before + after)  # old blocks from the replica's copy, new ones too
    assert replica.client().dbsize() == 80
    store.close()


# --- Cluster ----------------------------------------------------------------------------------
@pytest.fixture
def cluster_nodes(start_redis):
    """Three masters owning all 16384 slots between them, no replicas."""
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed")
    # The bus port is explicit: by default it is the port + 10000, which may be taken or > 65535.
    ports = free_ports(6)
    nodes = [start_redis(port, args=["--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                                     "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000"])
             for port, bus_port in zip(ports[:3], ports[3:])]
    subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
                    "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, capture_output=True, timeout=30)
    wait_until(lambda: all(node.client().cluster("info")["cluster_state"] == "ok" for node in nodes), 15,
               "cluster state ok")
    return nodes


def test_cluster_round_trip_over_many_slots_beside_a_plain_shard(cluster_nodes, redis_server):
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster_nodes[:2])  # the 3rd: learnt
    store = RedisBlockStore([url, redis_server.url], PREFIX, socket_timeout_s=1.0)
    blocks = make_blocks(300, seed=3)
    assert store.put(blocks) == [True] * 300
    on_nodes = [node.client().dbsize() for node in cluster_nodes]
    assert all(n > 30 for n in on_nodes) and sum(on_nodes) + redis_server.client().dbsize() == 300
    assert len({key_slot(block_key(PREFIX, h)) for h, _ in blocks}) > 100
    assert_bit_exact(store, blocks)

    missing = make_blocks(4, seed=4)
    hashes = [h for h, _ in blocks[:3]] + [h for h, _ in missing]
    assert [decode_block(FMT, h, v)[0] for h, v in zip(hashes, store.get(hashes))] == [HIT] * 3 + [MISSING] * 4
    assert store.contains(hashes) == [True] * 3 + [False] * 4
    assert store.delete(hashes) == 3 and store.get(hashes[:3]) == [None] * 3
    assert store.ping() and store.up and store.errors == 0
    store.close()


def test_a_hung_cluster_node_costs_one_timeout_per_call_not_one_per_block(cluster_nodes):
    store = RedisBlockStore(["redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster_nodes)], PREFIX,
                            socket_timeout_s=0.5, backoff_s=0.2, backoff_max_s=0.4)
    blocks = make_blocks(120, seed=5)  # ~40 on each node
    hashes = [h for h, _ in blocks]
    assert store.put(blocks) == [True] * 120
    hung = cluster_nodes[2].process
    hung.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        start = time.monotonic()
        assert store.get(hashes) == [None] * 120  # the cluster is one shard: the whole call misses
        assert time.monotonic() - start < 3.0  # one timeout (0.5 s), not ~40 (redis-py's ClusterPipeline)
        assert not store.up and store.errors == 1
        assert store.get(hashes) == [None] * 120 and store.errors == 1  # backing off: not even tried
    finally:
        hung.send_signal(signal.SIGCONT)
    wait_until(lambda: store.get(hashes[:1]) != [None], 5, "the cluster answers again")
    assert_bit_exact(store, blocks)
    assert store.up
    store.close()
