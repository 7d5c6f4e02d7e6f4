"""The engine on a GPU against transformers on the CPU. Skipped without CUDA."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import transformers

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.make_model import make_model
from protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=3))


def cuda_engine(model_dir: str, dtype: str, **model_settings) -> LLMEngine:
    config = LongctxConfig(
        model=ModelSettings(path=model_dir, dtype=dtype, device="cuda", **model_settings),
        cache=CacheSettings(block_size=16, num_device_blocks=256),
    )
    return LLMEngine(config)


def hf_greedy(model_dir: str, prompt: list[int], num_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_float32_greedy_on_cuda_equals_transformers_on_cpu(model_dir):
    prompt = [random.Random(0).randrange(3, 500) for _ in range(70)]
    ours = generate(cuda_engine(model_dir, "float32"), [prompt], SamplingParams(max_tokens=64, ignore_eos=True))
    assert ours[0][0].token_ids == hf_greedy(model_dir, prompt, 64)


def test_bfloat16_logprobs_stay_close_to_float32(model_dir):
    # bf16 keeps 8 mantissa bits: logits of magnitude ~10 move by ~0.1; 0.5 is a loose, safe bound.
    prompt = [random.Random(1).randrange(3, 500) for _ in range(50)]
    params = SamplingParams(max_tokens=1, logprobs=5)
    full = generate(cuda_engine(model_dir, "float32"), [prompt], params)[0][0].logprobs[0]
    half = generate(cuda_engine(model_dir, "bfloat16"), [prompt], params)[0][0].logprobs[0]
    assert abs(full.logprob - half.logprob) < 0.5


def test_fused_layer_kernels_compile_at_start_and_match_the_torch_ops(model_dir):
    """bf16 with the fused norm / RoPE / SiLU kernels (model.fused_layer_kernels) against the same
    model with torch's ops: they round at the same places, so the logprobs of a 50-token prompt's
    5 best next tokens agree to bf16 noise (0.05 against the 0.5 that bf16 moves from float32).
    No Triton kernel compiles inside the requests: they compiled at start."""
    from model_shards.triton_compiles import TritonCompileLog

    prompt = [random.Random(2).randrange(3, 500) for _ in range(50)]
    params = SamplingParams(max_tokens=4, logprobs=5, ignore_eos=True)
    fused_engine = cuda_engine(model_dir, "bfloat16")
    with TritonCompileLog() as compiles:
        fused = generate(fused_engine, [prompt], params)[0][0].logprobs[0]
    assert [c.kernel for c in compiles.take()] == []
    unfused = generate(cuda_engine(model_dir, "bfloat16", fused_layer_kernels=False), [prompt], params)[0][0].logprobs[0]
    assert unfused.token_id == fused.token_id
    best = dict(unfused.top_logprobs)
    assert max(abs(best.get(token, float("inf")) - logprob) for token, logprob in fused.top_logprobs) < 0.05


def test_a_step_budget_sized_prompt_allocates_no_device_memory_in_its_request(tmp_path):
    """The activations' memory is taken at start (ModelWorker._reserve_activation_memory) and kept
    cached: the first prompt of the step budget's size runs inside it, with no cudaMalloc in its
    request, stepped from another thread as a serving engine's loop does. Without the reserve the
    warm-ups' empty_cache leaves nothing cached, and this prompt's MLP rows (2040 x 3072 bf16,
    12.5 MB: torch's large pool) need new segments. That thread's first step warms it (cuDNN keeps
    plans per thread; session 17 on an H100: 2 new segments in that step), so a short request runs
    on it first and the count starts after."""
    folder = str(make_model(tmp_path / "small", "small", seed=5))
    config = LongctxConfig(model=ModelSettings(path=folder, dtype="bfloat16", device="cuda"),
                           cache=CacheSettings(block_size=16, num_device_blocks=512),
                           scheduler=SchedulerSettings(max_tokens_per_step=2048))  # fmt: skip
    engine = LLMEngine(config)
    worker = engine.executor.worker
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= worker._activation_bytes
    prompt = [random.Random(1).randrange(3, 16000) for _ in range(2040)]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    segments, outputs = [], []

    def serve() -> None:  # on one thread, as a serving loop's
        generate(engine, [prompt[:16]], params)  # warms this thread
        segments.append(torch.cuda.memory_stats()["segment.large_pool.allocated"])
        outputs.extend(generate(engine, [prompt], params))
        segments.append(torch.cuda.memory_stats()["segment.large_pool.allocated"])

    loop = threading.Thread(target=serve)
    loop.start()
    loop.join()
    assert len(outputs[0][0].token_ids) == 2
    assert segments[1] == segments[0]
