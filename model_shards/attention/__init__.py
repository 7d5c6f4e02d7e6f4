"""Attention backends by name (the name comes from the cluster config's `attention_backend`)."""

from __future__ import annotations

from model_shards.attention.base import AttentionBackend, AttentionMetadata
from model_shards.attention.torch_sdpa import TorchSDPABackend

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch_sdpa": TorchSDPABackend,
}


def get_attention_backend(name: str) -> AttentionBackend:
    """A new backend instance; unknown names raise ValueError listing the known ones."""
    try:
        backend_class = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: "
                         f"{', '.join(sorted(ATTENTION_BACKENDS))}") from None
    return backend_class()


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "TorchSDPABackend",
           "get_attention_backend"]
