"""KV bytes of a DeepSeek-V4 request, from the config alone (what a cache planner sizes blocks by).

Per token (grows with the context):
    CSA layer   (head_dim + index_head_dim) / m   one entry and one indexer key every m tokens
    HCA layer   head_dim / m'                     one entry every m' tokens
    sliding     0
Per request and layer (fixed, however long the context), at most:
    window      (W - 1) * head_dim                the raw K(=V) of the sliding window
    open window (m - 1) * 2 * width               projections and gate logits not yet folded
    overlap     m * 2 * dim                       CSA: the last closed window's first half
each times the element size. state.py's SequenceState.nbytes() measures the same quantities.
"""

from __future__ import annotations

from collections import Counter

from model_folder.deepseek_v4_config import CSA, HCA, DeepseekV4Architecture

BF16_BYTES = 2


def kv_bytes_per_token(arch: DeepseekV4Architecture, element_bytes: int = BF16_BYTES) -> dict[str, float]:
    """Bytes each new token adds, per layer type (summed over that type's layers) and "total"."""
    per_layer = {CSA: (arch.head_dim + arch.index_head_dim) / arch.compress_rate(CSA),
                 HCA: arch.head_dim / arch.compress_rate(HCA)}
    totals: Counter[str] = Counter()
    for layer_type in arch.layer_types:
        totals[layer_type] += per_layer.get(layer_type, 0.0) * element_bytes
    return {**totals, "total": sum(totals.values())}


def entry_bytes(arch: DeepseekV4Architecture, num_tokens: int, element_bytes: int = BF16_BYTES) -> dict[str, int]:
    """Exact bytes of compressed entries and indexer keys after `num_tokens` tokens, per layer type."""
    per_layer = {CSA: (num_tokens // arch.compress_rate(CSA)) * (arch.head_dim + arch.index_head_dim),
                 HCA: (num_tokens // arch.compress_rate(HCA)) * arch.head_dim}
    totals: Counter[str] = Counter()
    for layer_type in arch.layer_types:
        if layer_type in per_layer:
            totals[layer_type] += per_layer[layer_type] * element_bytes
    return dict(totals)


def max_fixed_bytes_per_request(arch: DeepseekV4Architecture, element_bytes: int = BF16_BYTES) -> int:
    """Upper bound of the bytes that do not grow with the context (window, open windows, overlaps)."""
    total = 0
    for layer_type in arch.layer_types:
        total += (arch.sliding_window - 1) * arch.head_dim
        if layer_type == HCA:
            total += _compressor_fixed(arch.compress_rate(HCA), arch.head_dim, overlapping=False)
        if layer_type == CSA:
            for dim in (arch.head_dim, arch.index_head_dim):
                total += _compressor_fixed(arch.compress_rate(CSA), dim, overlapping=True)
    return total * element_bytes


def _compressor_fixed(rate: int, dim: int, overlapping: bool) -> int:
    width = 2 * dim if overlapping else dim
    return (rate - 1) * 2 * width + (rate * 2 * dim if overlapping else 0)
