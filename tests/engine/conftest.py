"""Model folders and engines shared by the engine tests (CPU, float32)."""

from __future__ import annotations

import pytest

from cluster.config import (
    CacheSettings,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from model_shards.make_model import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("tiny-llama"), "tiny", seed=1))


@pytest.fixture(scope="session")
def v4_dir(tmp_path_factory) -> str:
    """The tiny DeepSeek-V4 preset: window 8, CSA every 4 tokens (top-4 indexer), HCA every 16."""
    from model_shards.deepseek_v4.presets import make_deepseek_v4_model

    return str(make_deepseek_v4_model(tmp_path_factory.mktemp("v4-engine"), "deepseek-v4-tiny", seed=3))


@pytest.fixture(scope="session")
def reference(v4_dir):
    """transformers' DeepSeek-V4 on `v4_dir`: the tests compare against its full forward."""
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM.from_pretrained(v4_dir).eval()


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("tiny-qwen2"), "tiny", seed=2, architecture="qwen2"))


def make_engine(model_dir: str, *, block_size=4, budget=2048, num_blocks=512, prefix_caching=True, max_num_seqs=64):
    config = LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=block_size, num_device_blocks=num_blocks, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerSettings(max_tokens_per_step=budget, max_num_seqs=max_num_seqs),
    )
    return LLMEngine(config)


@pytest.fixture(scope="session")
def make_engine_for():
    """A factory: make_engine_for(model_dir, block_size=4, budget=2048, num_blocks=512, ...)."""
    return make_engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> LLMEngine:
    return make_engine(tiny_model_dir)
