"""The Redis tier over TLS (`rediss://`, a password, a CA from the URL) against a real
redis-server with a self-signed certificate made by openssl for the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from tier_helpers import REDIS_SERVER, free_port

from model_shards.kv_io.redis_store import RedisBlockStore

OPENSSL = shutil.which("openssl")


@pytest.fixture
def tls_server(tmp_path: Path):
    """(port, CA file) of a TLS-only redis-server that wants the password "s3cret"."""
    if REDIS_SERVER is None or OPENSSL is None:
        pytest.skip("needs redis-server and openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", "s3cret", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password="s3cret", ssl=True, ssl_ca_certs=str(cert))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.skip("this redis-server was built without TLS")
            time.sleep(0.05)
    yield port, cert
    process.kill()
    process.wait()


def test_blocks_round_trip_over_tls_with_a_password(tls_server):
    port, cert = tls_server
    store = RedisBlockStore([f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"], b"tls-test:", ttl_s=60)
    items = [(os.urandom(32), os.urandom(size)) for size in (10, 70_000, 2 << 20)]
    assert store.put(items) == [True] * 3
    assert [bytes(v) for v in store.get([h for h, _ in items])] == [v for _, v in items]
    assert store.up and store.errors == 0


def test_a_wrong_password_or_an_untrusted_certificate_is_a_down_shard_not_a_crash(tls_server, tmp_path):
    port, cert = tls_server
    block = os.urandom(32)
    wrong_password = RedisBlockStore([f"rediss://:nope@127.0.0.1:{port}/0?ssl_ca_certs={cert}"], b"t:")
    assert wrong_password.put([(block, b"x")]) == [False] and not wrong_password.up
    untrusted = RedisBlockStore([f"rediss://:s3cret@127.0.0.1:{port}/0"], b"t:")  # the system CAs only
    assert untrusted.get([block]) == [None] and not untrusted.up
