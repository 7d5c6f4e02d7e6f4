"""DeepSeek-V4 blocks in the host and Redis tiers (tiny preset, CPU, float32, real redis-server):
a block's compressed part is written through when computed, its window part (window keys and
overlap halves) only every `window_part_interval_blocks`-th block and at the end of what was
computed, into its own host pool and Redis key. A restored prefix ends at a block whose window
part is at hand and resumes from it exactly, checked against transformers' full forward over the
final sequence; a missing or corrupt window part restores fewer blocks or none."""

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
INTERVAL = 4  # window parts at blocks 3, 7, 11, ... and at the end of each computed sequence
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


def window_part_blocks(num_prompt_tokens: int, num_generated: int) -> set[int]:
    """The blocks whose window parts a sequence writes: every INTERVAL-th, the prompt's last two
    full blocks' worth of ends, and every block filled while decoding (each the last full one)."""
    computed = num_prompt_tokens + num_generated - 1  # the last sampled token is never computed
    ends = {num_prompt_tokens // BLOCK - 1, (num_prompt_tokens - 1) // BLOCK - 1}
    decoded = range(num_prompt_tokens // BLOCK, computed // BLOCK)
    return {i for i in range(computed // BLOCK) if (i + 1) % INTERVAL == 0} | ends | set(decoded)


def test_the_host_tier_restores_an_evicted_prefix_up_to_a_block_with_its_window_part(v4_dir, full_forward_greedy):
    """10 compressed blocks and 7 window blocks on the device: two fillers evict the document's
    blocks of both pools. A request sharing its first 6 blocks restores 4 of them from host (block
    3 has a window part, 4 and 5 none); one sharing all 7 restores all 7 (block 6 is the last)."""
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=v4_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(num_device_blocks=10),
        scheduler=SchedulerSettings(max_tokens_per_step=32, max_num_seqs=2),
        kv_tiers=KVTierSettings(host_bytes=4 << 20, restore_policy="always", window_part_interval_blocks=INTERVAL)))
    document, fillers = random_prompt(1, 120), [random_prompt(2, 120), random_prompt(3, 120)]
    for prompt in (document, *fillers):
        [[result]] = generate(engine, [prompt], GREEDY)
        assert result.token_ids == full_forward_greedy(prompt, result.token_ids)
    tiers = engine.kv_cache.tiers
    assert window_part_blocks(120, 8) == {3, 6}
    assert (tiers.host.num_cached, tiers.windows.index.num_cached) == (3 * 7, 3 * 2)  # 1664 B parts, 11264 B
    for prompt, restored in ((document[:96] + random_prompt(4, 20), 64), (document[:112] + random_prompt(5, 20), 112)):
        [[result]] = generate(engine, [prompt], GREEDY)
        assert (result.num_prefix_hit_tokens, result.num_host_hit_tokens) == (restored, restored)
        assert result.token_ids == full_forward_greedy(prompt, result.token_ids)
        generate(engine, fillers, GREEDY)  # evicted from the device again


@pytest.mark.slow
def test_second_processes_restore_from_redis_up_to_a_window_part_and_a_wrong_key_never_hits(
        v4_dir, redis_server, full_forward_greedy, tmp_path):
    """`longctx generate` processes share one Redis (blocks sealed with an HMAC). The first writes
    every block's compressed part and a few window parts; the second restores every full block
    of the prompt; a third, sharing 13 blocks, restores 12 (block 11 has a window part, 12 none);
    with every window part corrupted a fourth recomputes; a fifth with another key finds every
    block unauthentic and recomputes. All exactly."""
    tokenizer = Tokenizer.from_folder(v4_dir)
    text = tokenizer.decode(random_prompt(5, 150), skip_special_tokens=True)
    prompt = tokenizer.encode(text)
    shared_text = tokenizer.decode(prompt[:13 * BLOCK + 3]) + tokenizer.decode(random_prompt(6, 40))
    shared = tokenizer.encode(shared_text)
    num_shared_blocks = next(i for i, (a, b) in enumerate(zip(prompt, shared)) if a != b) // BLOCK
    (tmp_path / "prompt.txt").write_text(text)
    (tmp_path / "shared.txt").write_text(shared_text)

    def generate_in_a_process(mac_key: str, prompt_file: str = "prompt.txt") -> dict:
        config = tmp_path / f"tiers-{mac_key}.yaml"
        config.write_text(f"kv_tiers:\n  host_bytes: {4 << 20}\n  redis_urls: ['{redis_server.url}']\n"
                          f"  restore_policy: always\n  redis_shared: true\n  redis_mac_key: {mac_key}\n"
                          f"  window_part_interval_blocks: {INTERVAL}\n")
        command = [sys.executable, "-m", "cluster.cli", "generate", "--model", v4_dir, "--device", "cpu", "--dtype",
                   "float32", "--prompt-file", str(tmp_path / prompt_file), "--max-tokens", "8", "--json",
                   "--config", str(config)]
        return json.loads(subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout)

    first = generate_in_a_process("k" * 16)
    full_blocks = (len(prompt) - 1) // BLOCK * BLOCK
    assert first["usage"]["prompt_tokens"] == len(prompt) and first["kv"]["computed_prefill_tokens"] == len(prompt)
    values = value_lengths(redis_server.client())
    window_parts = window_part_blocks(len(prompt), 8)
    assert len(values) == 2 and sorted(values.values()) == [len(window_parts), (len(prompt) + 8 - 1) // BLOCK]
    second = generate_in_a_process("k" * 16)
    assert second["kv"]["redis_hit_tokens"] == full_blocks > 100
    assert second["kv"]["computed_prefill_tokens"] == len(prompt) - full_blocks
    assert num_shared_blocks == 13 and {11, 12} & window_parts == {11}
    partial = generate_in_a_process("k" * 16, "shared.txt")
    assert partial["kv"]["redis_hit_tokens"] == 12 * BLOCK
    assert partial["token_ids"] == full_forward_greedy(shared, partial["token_ids"])
    corrupt_the_longest_values(redis_server.client())  # the window parts (11264 bytes, compressed 1664)
    corrupted = generate_in_a_process("k" * 16)
    assert corrupted["kv"]["computed_prefill_tokens"] == len(prompt)
    forged = generate_in_a_process("other-key-" * 2)
    assert forged["kv"]["computed_prefill_tokens"] == len(prompt)
    assert second["token_ids"] == corrupted["token_ids"] == forged["token_ids"] == first["token_ids"]
    assert first["token_ids"] == full_forward_greedy(prompt, first["token_ids"])


def value_lengths(client) -> dict[int, int]:
    """Redis values by length: how many of each."""
    lengths = [client.strlen(key) for key in client.scan_iter()]
    return {length: lengths.count(length) for length in set(lengths)}


def corrupt_the_longest_values(client) -> None:
    longest = max(value_lengths(client))
    for key in client.scan_iter():
        if client.strlen(key) == longest:
            last = client.getrange(key, longest - 1, longest - 1)
            client.setrange(key, longest - 1, bytes([last[0] ^ 0xFF]))
