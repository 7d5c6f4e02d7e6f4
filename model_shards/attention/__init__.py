"""Attention backends by name (the name comes from the cluster config's `attention_backend`).

`auto` picks per device: `cudnn_triton` (Triton paged decode, cuDNN prefill on bucketed shapes)
on a CUDA device in half precision when Triton is importable and the model's shapes suit the
kernel; else `torch_sdpa`, the reference that runs everywhere.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from model_shards.attention.base import AttentionBackend, AttentionMetadata
from model_shards.attention.torch_sdpa import TorchSDPABackend


def _cudnn_triton() -> AttentionBackend:
    from model_shards.attention.cudnn_triton import CudnnTritonBackend  # imports Triton

    return CudnnTritonBackend()


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch_sdpa": TorchSDPABackend,
    "cudnn_triton": _cudnn_triton,
}


def get_attention_backend(name: str) -> AttentionBackend:
    """A new backend instance; unknown names raise ValueError listing the known ones."""
    try:
        factory = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, "
                         f"{', '.join(sorted(ATTENTION_BACKENDS))}") from None
    return factory()


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int,
                              head_dim: int, num_heads: int, num_kv_heads: int) -> str:
    """`name`, or for `auto` the fastest backend that runs on this device, dtype and shape."""
    if name != "auto":
        return name
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "torch_sdpa"
    if importlib.util.find_spec("triton") is None:
        return "torch_sdpa"
    from model_shards.attention.triton_paged_decode import supports

    return "torch_sdpa" if supports(block_size, head_dim, num_heads, num_kv_heads) else "cudnn_triton"


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "TorchSDPABackend",
           "get_attention_backend", "resolve_attention_backend"]
