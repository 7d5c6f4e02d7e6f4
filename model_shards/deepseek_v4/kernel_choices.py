"""Where DeepSeek-V4 has more than one way to compute the same thing, which one a model runs
(`model.deepseek_v4_*` in cluster/config.py; tests and benches build them directly).

    chunk_attention  a prefill chunk's attention core (chunk_cores.py): auto, blocks or fused
    index_top_k      the indexer's top-k of a prefill chunk: ranked (one top-k over int64 keys the
                     scores kernel writes) or threshold (float32 scores, threshold_top_k.py)

Every choice computes the model's own result: the cores differ by where bf16 rounds the
probabilities, the top-k methods not at all (the same entries, the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

from model_shards.deepseek_v4.chunk_cores import check_chunk_core

INDEX_TOP_K_METHODS = ("ranked", "threshold")


@dataclass(frozen=True)
class KernelChoices:
    """The config's defaults (`model.deepseek_v4_*`, cluster/config.py; a test keeps them equal),
    so a model built directly runs what a served one does."""

    chunk_attention: str = "auto"
    index_top_k: str = "threshold"

    def __post_init__(self) -> None:
        check_chunk_core(self.chunk_attention)
        if self.index_top_k not in INDEX_TOP_K_METHODS:
            raise ValueError(f"deepseek_v4_index_top_k: {self.index_top_k!r} is not one of "
                             f"{', '.join(INDEX_TOP_K_METHODS)}")
