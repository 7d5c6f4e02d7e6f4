"""The KV tiers inside whole engines (tiny model, CPU, float32) against real redis-servers.

Every test compares greedy outputs with an engine that has no tiers: a restored block must give
exactly the tokens that recomputing it gives.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tier_helpers import damage_block, document, metric, tokens_of, wait_for

from cluster.cli import _parser, build_config
from cluster.config import (
    CacheSettings,
    KVTierSettings,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_folder.tokenizer import Tokenizer
from protocol.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
REPO = Path(__file__).resolve().parents[2]


def make_engine(model_dir: str, *, block_size=64, num_blocks=512, budget=2048, max_num_seqs=8, dtype="float32",
                **tiers) -> LLMEngine:
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype=dtype, device="cpu"),
        cache=CacheSettings(block_size=block_size, num_device_blocks=num_blocks),
        scheduler=SchedulerSettings(max_tokens_per_step=budget, max_num_seqs=max_num_seqs),
        kv_tiers=KVTierSettings(**tiers),
    ))


def redis_engine(model_dir: str, url: str, **kwargs) -> LLMEngine:
    kwargs.setdefault("host_bytes", 32 << 20)
    kwargs.setdefault("restore_policy", "always")
    return make_engine(model_dir, redis_urls=(url,), **kwargs)


@pytest.fixture(scope="module")
def reference(tier_model_dir):
    """Greedy outputs of an engine without tiers, memoized by prompt."""
    engine, cache = make_engine(tier_model_dir), {}

    def outputs(prompts, params=GREEDY) -> list[list[int]]:
        missing = [p for p in prompts if (tuple(p), params) not in cache]
        for prompt, tokens in zip(missing, tokens_of(generate(engine, missing, params))):
            cache[(tuple(prompt), params)] = tokens
        return [cache[(tuple(p), params)] for p in prompts]

    return outputs


def test_a_second_process_prefills_the_document_from_redis(tier_model_dir, redis_server, tmp_path):
    """Two `longctx generate` processes share one Redis: the second restores the document, but
    for its last block and any head the cost policy chose to recompute while fetching the rest."""
    tokenizer = Tokenizer.from_folder(tier_model_dir)
    text = tokenizer.decode(document(9000), skip_special_tokens=True)
    prompt_file = tmp_path / "doc.txt"
    prompt_file.write_text(text)
    command = [sys.executable, "-m", "cluster.cli", "generate", "--model", tier_model_dir, "--device", "cpu",
               "--dtype", "float32", "--prompt-file", str(prompt_file), "--max-tokens", "8", "--json",
               "--kv-host-bytes", str(64 << 20), "--kv-redis-url", redis_server.url]
    first, second = (json.loads(subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout)
                     for _ in range(2))
    num_prompt = first["usage"]["prompt_tokens"]
    last_block = num_prompt - 64 * ((num_prompt - 1) // 64)
    assert num_prompt > 8192
    assert first["kv"]["computed_prefill_tokens"] == num_prompt
    restored, computed = second["kv"]["redis_hit_tokens"], second["kv"]["computed_prefill_tokens"]
    assert restored + computed == num_prompt and (computed - last_block) % 64 == 0
    assert restored > num_prompt // 2
    assert second["kv"]["device_hit_tokens"] == second["kv"]["host_hit_tokens"] == 0
    assert second["token_ids"] == first["token_ids"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_value_is_detected_counted_and_recomputed(tier_model_dir, redis_server, reference, damage):
    doc = document(1000, seed=3)  # 15 full blocks of 64
    writer = redis_engine(tier_model_dir, redis_server.url)
    generate(writer, [doc], GREEDY)
    assert damage_block(redis_server.client(), writer, doc, index=5, damage=damage) == 1
    reader = redis_engine(tier_model_dir, redis_server.url)  # a second engine in this process
    result = generate(reader, [doc], GREEDY)[0][0]
    assert result.num_redis_hit_tokens == 5 * 64  # blocks 0-4; 5 failed, 6.. are past the break
    assert metric(reader, "longctx_kv_checksum_failures_total") == 1
    assert metric(writer, "longctx_kv_checksum_failures_total") == 0  # registries do not clash
    assert result.token_ids == reference([doc])[0]


def test_another_checkpoint_or_layout_never_hits(tier_model_dir, other_checkpoint_dir, redis_server, reference):
    doc = document(700, seed=4)
    generate(redis_engine(tier_model_dir, redis_server.url), [doc], GREEDY)
    keys_before = redis_server.client().dbsize()
    for model_dir, kwargs in ((other_checkpoint_dir, {}), (tier_model_dir, {"block_size": 32}),
                              (tier_model_dir, {"dtype": "bfloat16"})):
        engine = redis_engine(model_dir, redis_server.url, **kwargs)
        result = generate(engine, [doc], GREEDY)[0][0]
        assert result.num_redis_hit_tokens == 0 and metric(engine, "longctx_kv_redis_fetches_total",
                                                           {"outcome": "hit"}) == 0, (model_dir, kwargs)
    assert redis_server.client().dbsize() > keys_before  # each wrote its own namespace
    same = redis_engine(tier_model_dir, redis_server.url)
    assert generate(same, [doc], GREEDY)[0][0].num_redis_hit_tokens == 640  # the control: it does hit


def pressure_workload(seed: int) -> list[list[int]]:
    """Four 256-token documents, each asked for twice: more KV than device and host hold."""
    docs = [document(256, seed=seed + i) for i in range(4)]
    return [docs[i % 4] + document(8, seed=seed + 100 + i) for i in range(8)]


def pressure_engine(model_dir: str, url: str, **kwargs) -> LLMEngine:
    """Device: 40 blocks of 16 tokens (two requests); host: 12 blocks; the rest goes to Redis."""
    return redis_engine(model_dir, url, block_size=16, num_blocks=40, budget=64, max_num_seqs=2,
                        host_bytes=12 * 8192, **kwargs)


PRESSURE_PARAMS = SamplingParams(max_tokens=32, temperature=0.0)


def test_memory_pressure_spills_device_to_host_to_redis_and_output_is_exact(tier_model_dir, redis_server, reference):
    """Without write-through, blocks reach Redis only by the spill chain: device -> host -> Redis."""
    prompts = pressure_workload(seed=10)
    engine = pressure_engine(tier_model_dir, redis_server.url, redis_write_through=False)
    assert tokens_of(generate(engine, prompts, PRESSURE_PARAMS)) == reference(prompts, PRESSURE_PARAMS)
    for path in ("device_to_host", "host_to_device", "host_to_redis", "redis_to_host"):
        assert metric(engine, "longctx_kv_transfer_bytes_total", {"path": path}) > 0, path
    assert metric(engine, "longctx_kv_hit_tokens_total", {"tier": "redis"}) > 0


def test_redis_killed_mid_generation_changes_no_output_and_the_tier_comes_back(
        tier_model_dir, start_redis, reference):
    server = start_redis()
    engine = pressure_engine(tier_model_dir, server.url, redis_socket_timeout_s=0.5, redis_retry_backoff_s=0.2,
                             redis_retry_backoff_max_s=0.2)
    prompts = pressure_workload(seed=20)

    def redis_served_a_prefix() -> bool:
        return metric(engine, "longctx_kv_hit_tokens_total", {"tier": "redis"}) > 0

    outputs = _generate_killing(engine, prompts, PRESSURE_PARAMS, kill_when=redis_served_a_prefix, kill=server.kill)
    assert outputs == reference(prompts, PRESSURE_PARAMS)
    assert metric(engine, "longctx_kv_redis_errors_total") > 0
    assert metric(engine, "longctx_kv_redis_up") == 0
    start_redis(server.port)  # the same address: the tier reconnects after its backoff
    later = [document(200, seed=30)]
    deadline = time.monotonic() + 15  # backoff 0.2 s; the rest is slack for a loaded CI machine
    while True:
        time.sleep(0.3)
        assert tokens_of(generate(engine, later, PRESSURE_PARAMS)) == reference(later, PRESSURE_PARAMS)
        if metric(engine, "longctx_kv_redis_up") == 1 or time.monotonic() > deadline:
            break
    assert metric(engine, "longctx_kv_redis_up") == 1


def _generate_killing(engine: LLMEngine, prompts, params, kill_when, kill) -> list[list[int]]:
    """Generate, calling kill() once, after the first step at which kill_when() holds."""
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
        outputs[f"r{index}"] = []
    killed = False
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs[delta.request_id].extend(delta.token_ids)
        if not killed and kill_when():
            kill()
            killed = True
    assert killed
    return [outputs[f"r{index}"] for index in range(len(prompts))]


def test_redis_down_at_start_serves_warns_and_reconnects(tier_model_dir, start_redis, free_tcp_port, reference,
                                                         caplog):
    url = f"redis://127.0.0.1:{free_tcp_port}/0"
    with caplog.at_level(logging.WARNING):
        engine = redis_engine(tier_model_dir, url, redis_retry_backoff_s=0.2, redis_retry_backoff_max_s=0.2)
    assert "unreachable at start" in caplog.text
    doc = document(300, seed=5)
    assert tokens_of(generate(engine, [doc], GREEDY)) == reference([doc])
    assert metric(engine, "longctx_kv_redis_up") == 0
    server = start_redis(free_tcp_port)
    time.sleep(0.3)
    other = document(300, seed=6)
    assert tokens_of(generate(engine, [other], GREEDY)) == reference([other])
    assert metric(engine, "longctx_kv_redis_up") == 1
    assert wait_for(lambda: server.client().dbsize() > 0)  # written through in the background


def test_the_host_tier_alone_restores_an_evicted_prefix(tier_model_dir, reference):
    engine = make_engine(tier_model_dir, block_size=16, num_blocks=40, host_bytes=64 * 8192, restore_policy="always")
    doc, filler = document(400, seed=7), document(400, seed=8)  # 26 blocks each, with their outputs
    for prompt in (doc, filler):  # the filler evicts the doc's last 12 blocks: they spill to host
        assert tokens_of(generate(engine, [prompt], GREEDY)) == reference([prompt])
    again = generate(engine, [doc], GREEDY)[0][0]
    assert again.token_ids == reference([doc])[0]
    assert again.num_prefix_hit_tokens == 384 and again.num_host_hit_tokens == 384 - 224


def test_cli_tier_flags_reach_the_config(tier_model_dir):
    args = _parser().parse_args(["generate", "--model", tier_model_dir, "--prompt", "x", "--kv-host-bytes", "1024",
                                 "--kv-redis-url", "redis://a:1,rediss://:pw@b:2", "--kv-redis-url", "redis://c:3"])
    tiers = build_config(args).kv_tiers
    assert tiers.host_bytes == 1024
    assert tiers.redis_urls == ("redis://a:1", "rediss://:pw@b:2", "redis://c:3")
