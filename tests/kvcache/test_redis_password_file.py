"""`kv_tiers.redis_password_file`: the password comes from a mounted secret, not the URL (the Helm
chart keeps it out of the RayService object), checked against a real redis-server with requirepass."""

from __future__ import annotations

import pytest

from cluster.config import KVTierSettings
from model_shards.kv_io.kv_transfer import _redis_urls
from model_shards.kv_io.redis_store import RedisBlockStore
from protocol.redis_urls import parse_redis_url, with_password


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/0", "redis://:p%2Fw%40rd@h:6379/0"),
        ("rediss://h/0?ssl_ca_certs=/ca.crt", "rediss://:p%2Fw%40rd@h/0?ssl_ca_certs=/ca.crt"),
        ("redis+sentinel://s1,s2:26380/main", "redis+sentinel://:p%2Fw%40rd@s1,s2:26380/main"),
        ("unix:///run/redis.sock", "unix://:p%2Fw%40rd@/run/redis.sock"),
        ("redis://:own@h:6379/0", "redis://:own@h:6379/0"),  # credentials in the URL win
    ],
)
def test_with_password_puts_the_quoted_password_where_the_url_has_none(url, expected):
    assert with_password(url, "p/w@rd") == expected
    if "@" not in url:
        assert parse_redis_url(expected).password == "p/w@rd"


def test_the_password_file_opens_a_password_protected_server(start_redis, tmp_path):
    server = start_redis()
    server.client().config_set("requirepass", "from-a-secret")  # after start: the fixture pings without one
    password_file = tmp_path / "password"
    password_file.write_text("from-a-secret\n")  # a trailing newline, as `kubectl create secret --from-file` keeps
    settings = KVTierSettings(host_bytes=1 << 20, redis_urls=(server.url,), redis_password_file=str(password_file))
    store = RedisBlockStore(_redis_urls(settings), b"password-file:", ttl_s=60)
    assert store.put([(b"h" * 32, b"value")]) == [True]
    assert [bytes(value) for value in store.get([b"h" * 32])] == [b"value"]
    without = RedisBlockStore(settings.redis_urls, b"password-file:", ttl_s=60)
    assert not without.ping()


def test_an_unreadable_password_file_is_a_clear_error(tmp_path):
    settings = KVTierSettings(host_bytes=1, redis_urls=("redis://h/0",), redis_password_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="redis_password_file: cannot read"):
        _redis_urls(settings)
