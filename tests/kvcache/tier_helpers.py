"""Helpers shared by the engine-level KV-tier tests (imported by name: conftest.py puts this
folder on sys.path, since pytest's importlib mode does not)."""

from __future__ import annotations

import random
import shutil
import socket
import time

from engine.llm_engine import LLMEngine
from engine.request import Request
from kvcache.block_hash import root_hash
from protocol.sampling_params import SamplingParams

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def document(num_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(num_tokens)]


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tokens_of(results) -> list[list[int]]:
    return [sequences[0].token_ids for sequences in results]


def metric(engine: LLMEngine, name: str, labels: dict | None = None) -> float:
    return engine.kv_cache.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def block_hashes(engine: LLMEngine, prompt: list[int]) -> list[bytes]:
    return Request("x", prompt, SamplingParams(), root_hash(engine.model_fingerprint), engine.block_size).block_hashes


def damage_block(client, engine: LLMEngine, prompt: list[int], index: int, damage: str) -> int:
    """Damage the Redis values of the prompt's block `index`: flip a payload byte, or truncate.
    With several ranks each holds its own value (one namespace each): only the first, in key
    order, is damaged. Returns how many values the block has."""
    suffix = block_hashes(engine, prompt)[index].hex().encode()
    keys = sorted(k for k in client.scan_iter(count=1000) if k.endswith(suffix))
    if damage == "flip":
        client.setrange(keys[0], client.strlen(keys[0]) - 100, b"\x7f")
    else:
        client.set(keys[0], client.get(keys[0])[:-64])
    return len(keys)
