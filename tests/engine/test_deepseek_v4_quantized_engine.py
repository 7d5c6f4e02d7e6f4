"""The engine serves a DeepSeek-V4 folder in DeepSeek's released layout (FP8 linears, FP4
experts): greedy tokens and logprobs equal transformers' full forward over the final sequence
with the folder loaded `dequantize=True` (1e-4, float32), and our model alone decoding the same
prompt greedily (which tests/model_shards/test_deepseek_v4_quantized.py shows bit-equal to a
float32 folder of the dequantized weights) gives the same tokens."""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from transformers import DeepseekV4ForCausalLM as ReferenceModel
from transformers import FineGrainedFP8Config

from cluster.arguments import add_engine_arguments, build_config
from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_folder.deepseek_v4_quantization import BlockQuantization
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from protocol.sampling_params import SamplingParams

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> str:
    quantization = BlockQuantization(scale_format="ue8m0", expert_format="fp4")
    return str(make_deepseek_v4_model(tmp_path_factory.mktemp("v4-released"), "deepseek-v4-tiny", seed=4,
                                      quantization=quantization))


def model_greedy(folder: str, prompt: list[int], count: int) -> list[int]:
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    state, ids, tokens = model.new_state(), torch.tensor(prompt), []
    for _ in range(count):
        tokens.append(int(model.compute_logits(model(ids, state)[-1:]).argmax()))
        ids = torch.tensor(tokens[-1:])
    return tokens


def test_engine_on_a_released_folder_equals_the_dequantized_reference(released):
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=released, dtype="float32", device="cpu"),
        cache=CacheSettings(cpu_kv_bytes=8 << 20),
        scheduler=SchedulerSettings(max_tokens_per_step=13, max_tokens_per_step_while_decoding=13)))
    rng = random.Random(0)
    prompt = [rng.randrange(3, 1000) for _ in range(120)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    result = generate(engine, [prompt], params)[0][0]
    reference = ReferenceModel.from_pretrained(released, quantization_config=FineGrainedFP8Config(dequantize=True),
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + result.token_ids]), use_cache=False).logits[0, len(prompt) - 1:-1]
    assert result.token_ids == logits.argmax(-1).tolist() == model_greedy(released, prompt, 12)
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in result.logprobs]), expected, atol=ATOL, rtol=0)
    assert len(set(result.token_ids)) > 3


def test_engine_keeping_weights_quantized_writes_the_same_greedy_text(released):
    """model.quantized_weights keep: the same greedy tokens and logprobs as the dequantizing model
    (off CUDA the kept weights compute the same numbers: test_deepseek_v4_kept_weights.py)."""
    def run(quantized_weights: str):
        engine = LLMEngine(LongctxConfig(
            model=ModelSettings(path=released, dtype="float32", device="cpu", quantized_weights=quantized_weights),
            cache=CacheSettings(cpu_kv_bytes=8 << 20),
            scheduler=SchedulerSettings(max_tokens_per_step=13, max_tokens_per_step_while_decoding=13)))
        rng = random.Random(1)
        prompt = [rng.randrange(3, 1000) for _ in range(40)]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
        experts = engine.executor.worker.model.layers[1].mlp.experts
        assert (experts.gate_up is None) == (quantized_weights == "keep")  # the option reached the worker
        return generate(engine, [prompt], params)[0][0]

    kept, dequantized = run("keep"), run("dequantize")
    assert kept.token_ids == dequantized.token_ids and len(set(kept.token_ids)) > 2
    assert [t.logprob for t in kept.logprobs] == [t.logprob for t in dequantized.logprobs]


def test_the_quantized_weights_flag_reaches_the_config(released):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert build_config(parser.parse_args(["--model", released])).model.quantized_weights == "dequantize"
    assert build_config(parser.parse_args(["--model", released, "--quantized-weights", "keep"])
                        ).model.quantized_weights == "keep"
