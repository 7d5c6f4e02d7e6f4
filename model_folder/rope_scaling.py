"""How a config scales RoPE: one small value type shared by every architecture's config parser.

A leaf module: hf_config.py (Llama family) and deepseek_v4_config.py (its compressed-attention RoPE)
both build it, and hf_config dispatches to deepseek_v4_config, so it cannot live in either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling method, normalized from either `rope_scaling` or `rope_parameters`.

    Fields a method does not use stay None. `original_max_position_embeddings` is filled for yarn
    and llama3 the way transformers fills it (the top-level key wins, else max_position_embeddings).
    """

    rope_type: str  # linear | dynamic | yarn | llama3
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn
