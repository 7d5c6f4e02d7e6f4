"""Shared spawned worlds (2 and 4 ranks, gloo) and model folders for the parallelism tests.

Spawning a rank costs seconds (a fresh interpreter importing torch), so each world is started
once per session and every test runs its jobs on it (each job builds its own groups and model).
The 2-rank world is tests/conftest.py's `world2`, which the KV tiers' tests use too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The ranks import the jobs they run by module name (pickled functions), and spawned children
# inherit sys.path: this folder on it makes `rank_jobs` importable in both (pytest's importlib
# mode does not add test folders).
sys.path.insert(0, str(Path(__file__).parent))

from executors.rank_processes import RankProcesses
from model_shards.make_model import make_model


@pytest.fixture(scope="session")
def world4():
    processes = RankProcesses(4, "cpu")
    yield processes
    processes.shutdown()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny preset: 4 query heads, 2 KV heads, vocab 1024: divisible by TP 2."""
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_mqa_folder(tmp_path_factory) -> Path:
    """One KV head: under TP 2 each rank holds a replica of it."""
    return make_model(tmp_path_factory.mktemp("tiny-mqa"), "tiny", seed=4, num_key_value_heads=1)
