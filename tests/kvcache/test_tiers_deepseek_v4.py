"""DeepSeek-V4 blocks in the host and Redis tiers (tiny preset, CPU, float32, real redis-server):
a tier slot holds block i of both page pools (compressed entries, then the window keys and overlap
halves), written through when computed; a restored prefix resumes from it exactly, checked against
transformers' full forward over the final sequence."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV4ForCausalLM as ReferenceModel

from cluster.config import CacheSettings, KVTierSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_folder.tokenizer import Tokenizer
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from protocol.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory) -> str:
    return str(make_deepseek_v4_model(tmp_path_factory.mktemp("v4-tiers"), "deepseek-v4-tiny", seed=5))


@pytest.fixture(scope="module")
def full_forward_greedy(v4_dir):
    """prompt, outputs -> the full forward's argmax at every generated position."""
    reference = ReferenceModel.from_pretrained(v4_dir).eval()

    def argmax(prompt: list[int], outputs: list[int]) -> list[int]:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + outputs]), use_cache=False).logits[0]
        return logits[len(prompt) - 1:-1].argmax(-1).tolist()

    return argmax


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]


def test_the_host_tier_restores_an_evicted_prefix_with_its_window(v4_dir, full_forward_greedy):
    """10 compressed blocks and 7 window blocks on the device: two fillers evict the document's
    blocks of both pools; its 7 full blocks come back from host (both parts), exactly."""
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=v4_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(num_device_blocks=10),
        scheduler=SchedulerSettings(max_tokens_per_step=32, max_num_seqs=2),
        kv_tiers=KVTierSettings(host_bytes=4 << 20, restore_policy="always")))
    document = random_prompt(1, 120)
    for prompt in (document, random_prompt(2, 120), random_prompt(3, 120)):
        [[result]] = generate(engine, [prompt], GREEDY)
        assert result.token_ids == full_forward_greedy(prompt, result.token_ids)
    again = document[:112] + random_prompt(4, 20)  # shares the document's 7 full blocks
    [[result]] = generate(engine, [again], GREEDY)
    assert (result.num_prefix_hit_tokens, result.num_host_hit_tokens) == (112, 112)
    assert result.token_ids == full_forward_greedy(again, result.token_ids)


@pytest.mark.slow
def test_a_second_process_restores_the_prompt_from_redis_and_a_wrong_key_never_hits(
        v4_dir, redis_server, full_forward_greedy, tmp_path):
    """Two `longctx generate` processes share one Redis (blocks sealed with an HMAC): the second
    restores every full block of the prompt and computes the rest; a third with another key
    finds every block unauthentic and recomputes, exactly."""
    tokenizer = Tokenizer.from_folder(v4_dir)
    text = tokenizer.decode(random_prompt(5, 150), skip_special_tokens=True)
    prompt = tokenizer.encode(text)
    (tmp_path / "prompt.txt").write_text(text)

    def generate_in_a_process(mac_key: str) -> dict:
        config = tmp_path / f"tiers-{mac_key}.yaml"
        config.write_text(f"kv_tiers:\n  host_bytes: {4 << 20}\n  redis_urls: ['{redis_server.url}']\n"
                          f"  restore_policy: always\n  redis_shared: true\n  redis_mac_key: {mac_key}\n")
        command = [sys.executable, "-m", "cluster.cli", "generate", "--model", v4_dir, "--device", "cpu", "--dtype",
                   "float32", "--prompt-file", str(tmp_path / "prompt.txt"), "--max-tokens", "8", "--json",
                   "--config", str(config)]
        return json.loads(subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout)

    first, second, forged = (generate_in_a_process(key) for key in ("k" * 16, "k" * 16, "other-key-" * 2))
    full_blocks = (len(prompt) - 1) // BLOCK * BLOCK
    assert first["usage"]["prompt_tokens"] == len(prompt) and first["kv"]["computed_prefill_tokens"] == len(prompt)
    assert second["kv"]["redis_hit_tokens"] == full_blocks > 100
    assert second["kv"]["computed_prefill_tokens"] == len(prompt) - full_blocks
    assert forged["kv"]["computed_prefill_tokens"] == len(prompt)
    assert second["token_ids"] == forged["token_ids"] == first["token_ids"]
    assert first["token_ids"] == full_forward_greedy(prompt, first["token_ids"])
