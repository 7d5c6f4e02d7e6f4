"""Which attention core runs a DeepSeek-V4 prefill chunk (`model.deepseek_v4_chunk_attention`).

    auto     fused for CSA layers on a GPU, blocks for the rest (the default): on an H200 the
             kernel took 12.6 ms a 16K-token CSA chunk against 16.9 for blocks at 128K-1M, and
             lost on HCA layers (115 against 52 ms at 1M: head_dim 512 leaves a program 64 rows
             of float32 output in registers, too few to keep the tensor cores busy over ~8,200
             entries); docs/deepseek_v4.md "Session 11"
    blocks   sink_attention.py: each block of queries' logits in memory, then the softmax kernel
             and the probabilities times the keys (the layers' path since the first session)
    fused    chunk_attention_kernel.py: one flash-style Triton kernel, no logits in memory, where
             it applies (head_dim a power of two, the entries in the queries' dtype); blocks else.
             Without CUDA it runs in Triton's interpreter: correct, and far slower (tests only).

Both compute the model's attention (the same keys, masks, sink and rounding of logits); they
differ by where bf16 rounds the probabilities (chunk_attention_kernel.py says how much).
The layers call `attend_chunk` at call time, so a profiler can wrap it (bench/deepseek_v4_sections.py).
"""

from __future__ import annotations

import torch

from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention

CHUNK_ATTENTION_CORES = ("auto", "blocks", "fused")


def check_chunk_core(name: str) -> str:
    if name not in CHUNK_ATTENTION_CORES:
        raise ValueError(f"deepseek_v4_chunk_attention: {name!r} is not one of {', '.join(CHUNK_ATTENTION_CORES)}")
    return name


def attend_chunk(core: str, q: torch.Tensor, window_keys: torch.Tensor, sliding_window: int,
                 compressed: CompressedKeys | None, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, heads, head_dim), window_keys (w + T, head_dim) -> (T, heads, head_dim) by `core`."""
    if _fused_wanted(core, q, compressed) and fused_applies(q, compressed):
        from model_shards.deepseek_v4.chunk_attention_kernel import chunk_attention

        return chunk_attention(q, window_keys, sliding_window, compressed, sinks, scale)
    return sink_attention(q, window_keys, sliding_window, compressed, sinks, scale)


def _fused_wanted(core: str, q: torch.Tensor, compressed: CompressedKeys | None) -> bool:
    csa_on_gpu = q.is_cuda and compressed is not None and compressed.selected is not None
    return core == "fused" or (core == "auto" and csa_on_gpu)


def fused_applies(q: torch.Tensor, compressed: CompressedKeys | None) -> bool:
    dim = q.shape[-1]
    power_of_two = dim >= 16 and dim & (dim - 1) == 0
    return power_of_two and (compressed is None or compressed.entries.dtype == q.dtype)
