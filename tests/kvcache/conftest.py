"""Fixtures of the KV-tier tests: private redis-server processes and tiny model folders.

Every test that needs Redis starts its own server on a free port (no shared state, no fixed
port) and kills it at teardown; without a redis-server binary those tests skip.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# The test modules import tier_helpers.py by name (pytest's importlib mode adds no test folder).
sys.path.insert(0, str(Path(__file__).parent))

from tier_helpers import REDIS_SERVER, free_port  # noqa: E402 (after the sys.path line above)


class RedisServer:
    """One redis-server process without persistence, on 127.0.0.1; `args` are more options
    (`--cluster-enabled yes`), `config` a config file read first (a sentinel needs one)."""

    def __init__(self, workdir: Path, port: int | None = None, args: Sequence[str] = (), config: Path | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.args = tuple(args)
        self.config = config
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [REDIS_SERVER, *([str(self.config)] if self.config else []), "--port", str(self.port), "--bind",
             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def _answers(self) -> bool:
        import redis

        try:
            return self.client().ping()
        except redis.RedisError:
            return False


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """start_redis(port=None, args=(), config=None) -> a running RedisServer; all are killed
    after the test."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    servers: list[RedisServer] = []

    def start(port: int | None = None, args: Sequence[str] = (), config: Path | None = None) -> RedisServer:
        servers.append(RedisServer(tmp_path, port, args, config).start())
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()


@pytest.fixture
def redis_server(start_redis) -> RedisServer:
    return start_redis()


@pytest.fixture(scope="session")
def tier_model_dir(tmp_path_factory) -> str:
    """The tiny preset, with room for the 8K-token documents of these tests."""
    from model_shards.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("tiers-tiny"), "tiny", seed=1, max_position_embeddings=16384))


@pytest.fixture(scope="session")
def other_checkpoint_dir(tmp_path_factory) -> str:
    """The same architecture as tier_model_dir with other weights (another fine-tune)."""
    from model_shards.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("tiers-tiny-other"), "tiny", seed=2, max_position_embeddings=16384))
