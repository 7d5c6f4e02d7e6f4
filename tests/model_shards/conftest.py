"""Fixtures for the model_shards tests: model folders from make_model, and running our model."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model_shards.attention import AttentionMetadata
from model_shards.llama import LlamaForCausalLM
from model_shards.make_model import make_model

sys.path.insert(0, str(Path(__file__).parent))  # sm90_compile, the *_compile tests' shared helper

# Small enough for CPU float32 in milliseconds, large enough that every head-count ratio used in
# the tests (8 heads over 8, 2 or 1 KV heads) and every RoPE branch (16-dim heads give 8
# frequencies) is exercised. qwen2 needs heads * head_dim == hidden.
TEST_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=16, vocab_size=1024)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_model(**TEST_SHAPE overridden by kwargs), one folder per distinct kwargs per session.
    Tests that damage a folder must copy it first (see `fresh_folder`)."""
    folders: dict[str, Path] = {}

    def make(**kwargs: Any) -> Path:
        settings = {**TEST_SHAPE, **kwargs}
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in folders:
            folders[key] = make_model(tmp_path_factory.mktemp("model"), seed=0, **settings)
        return folders[key]

    return make


@pytest.fixture
def fresh_folder(tmp_path: Path) -> Callable[..., Path]:
    """A private model folder that a test may edit or damage."""
    def make(**kwargs: Any) -> Path:
        return make_model(tmp_path / "model", seed=0, **{**TEST_SHAPE, **kwargs})

    return make


def prefill_logits(model: LlamaForCausalLM, tokens: torch.Tensor, block_size: int = 4) -> torch.Tensor:
    """Logits (len(tokens), vocab) float32 of one sequence prefilled at once into a fresh cache."""
    num_blocks = -(-len(tokens) // block_size)
    kv_cache = model.allocate_kv_cache(num_blocks, block_size)
    metadata = AttentionMetadata.build([(list(range(num_blocks)), 0, len(tokens))], block_size,
                                       model.device)
    return model.compute_logits(model(tokens, metadata.positions, metadata, kv_cache))


@pytest.fixture(name="prefill_logits")
def prefill_logits_fixture() -> Callable[..., torch.Tensor]:
    return prefill_logits
