"""Whole-model measurements of bench/gpu.py: the engine with its defaults, transformers (sdpa) on
the same folder, and bf16 logits against a float32 dense reference."""

from __future__ import annotations

import random
import time

import torch

from bench.gpu_cases import free_memory, synchronize


def random_prompt(tokens: int, seed: int, vocab_size: int) -> list[int]:
    """The same ids for the same (tokens, seed) whatever the vocabulary past 120,000 (ids >= 100
    avoid special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab_size, 120_000)) for _ in range(tokens)]


def make_engine(model_dir: str, device: torch.device, max_model_len: int, **model_settings):
    """The engine with every default but the device, dtype and context length: what a user gets
    (`model_settings`: other ModelSettings, for an A/B against a default)."""
    from cluster.config import LongctxConfig, ModelSettings
    from engine.llm_engine import LLMEngine

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    return LLMEngine(LongctxConfig(model=ModelSettings(path=model_dir, device=str(device), dtype=dtype,
                                                       max_model_len=max_model_len, **model_settings)))


def engine_single(engine, tokens: int, output_tokens: int = 32) -> dict:
    """One request alone: TTFT (prefill) and time per output token (decode at batch 1)."""
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    prompt = random_prompt(tokens, tokens, engine.architecture.vocab_size)
    result = generate(engine, [prompt], SamplingParams(max_tokens=output_tokens, ignore_eos=True))[0][0]
    return {"ttft_s": result.ttft_s, "tpot_ms": result.tpot_s * 1e3, "tokens": list(result.token_ids)[:8]}


def engine_batch_decode(engine, tokens: int, batch: int, output_tokens: int = 32) -> dict:
    """`batch` requests over one shared `tokens`-long prefix (cached by engine_single's run of the
    same prompt) plus 64 tokens of their own: decode latency at that batch over long contexts."""
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    vocab_size = engine.architecture.vocab_size
    prefix = random_prompt(tokens, tokens, vocab_size)[:tokens - 64]
    prompts = [prefix + random_prompt(64, tokens + i + 1, vocab_size) for i in range(batch)]
    start = time.perf_counter()
    results = generate(engine, prompts, SamplingParams(max_tokens=output_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    tpots = sorted(r[0].tpot_s * 1e3 for r in results)
    return {"batch": batch, "tpot_ms_median": tpots[len(tpots) // 2], "tpot_ms_max": tpots[-1],
            "output_tok_per_s": batch * output_tokens / elapsed}


def load_hf(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


@torch.no_grad()
def hf_single(model, tokens: int, device: torch.device, output_tokens: int = 32) -> dict:
    """transformers' generate on the same prompt as engine_single: TTFT, and time per token unless
    output_tokens is 0."""
    ids = torch.tensor([random_prompt(tokens, tokens, model.config.vocab_size)], device=device)
    model.generate(ids[:, :64], max_new_tokens=2, do_sample=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    synchronize(device)
    ttft = time.perf_counter() - start
    if output_tokens == 0:
        return {"ttft_s": ttft, "peak_GiB": _peak_gib(device)}
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False)
    synchronize(device)
    total = time.perf_counter() - start
    return {"ttft_s": ttft, "tpot_ms": (total - ttft) / (output_tokens - 1) * 1e3,
            "tokens": out[0, tokens:tokens + 8].tolist(), "peak_GiB": _peak_gib(device)}


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


@torch.no_grad()
def ours_last_logits(model_dir: str, tokens: int, rows: int, step_tokens: int, device: torch.device) -> torch.Tensor:
    """Logits (rows, vocab) float32 of the last `rows` positions from our bf16 model, the prompt
    prefilled in step_tokens chunks through the paged cache and the auto attention backend."""
    from model_shards.attention import resolve_attention_backend
    from model_shards.attention.base import AttentionMetadata
    from model_folder.hf_config import load_architecture
    from model_shards.llama import LlamaForCausalLM

    arch, block_size = load_architecture(model_dir), 64
    backend = resolve_attention_backend("auto", device, torch.bfloat16, block_size, arch.head_dim,
                                        arch.num_attention_heads, arch.num_key_value_heads)
    model = LlamaForCausalLM.from_folder(model_dir, dtype=torch.bfloat16, device=device, attention_backend=backend)
    attention = model.layers[0].self_attn  # plans built as the engine's worker builds them
    attention.backend.warm_up(device, torch.bfloat16, attention.num_heads, attention.num_kv_heads, arch.head_dim,
                              block_size, step_tokens, tokens)
    kv_cache = model.allocate_kv_cache(-(-tokens // block_size), block_size)
    table = list(range(kv_cache.num_blocks))
    ids = torch.tensor(random_prompt(tokens, tokens, arch.vocab_size), device=device)
    for start in range(0, tokens, step_tokens):
        count = min(step_tokens, tokens - start)
        metadata = AttentionMetadata.build([(table, start, count)], block_size, device)
        hidden = model(ids[start:start + count], metadata.positions, metadata, kv_cache)
    logits = model.compute_logits(hidden[-rows:])
    del model, kv_cache
    free_memory()
    return logits


@torch.no_grad()
def reference_last_logits(model_dir: str, tokens: int, rows: int, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """The same positions from transformers in `dtype`, dense attention over the whole prompt."""
    model = load_hf(model_dir, device, dtype)
    ids = torch.tensor([random_prompt(tokens, tokens, model.config.vocab_size)], device=device)
    logits = model(ids, logits_to_keep=rows).logits[0].float()  # (rows, vocab)
    del model
    free_memory()
    return logits


def compare_logits(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    difference = ours - reference
    return {
        "relative_error": (difference.norm() / reference.norm()).item(),
        "max_abs": difference.abs().max().item(),
        "mean_abs": difference.abs().mean().item(),
        "logit_std": reference.std().item(),
        "top1_agreement": (ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }
