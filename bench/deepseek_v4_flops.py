"""Matmul FLOPs of a DeepSeek-V4 forward, per component, counted from the config (2 per
multiply-add; elementwise work, softmax and top-k are not counted).

Per token at position p, per layer (H heads of D, W window, m / m' compress rates):
    projections   q_a, q_b, kv, grouped o_a, o_b
    compressor    kv + gate projections (CSA: 2D wide each; HCA: D), and the indexer's own
    indexer       q_b, weights_proj; scores H_i * D_i per closed entry ((p + 1) // m of them)
    attention     QK and PV over W window keys + (CSA: top-k entries; HCA: (p + 1) // m' entries)
    mhc           the pre/post/comb maps of both blocks
    moe           router, k routed experts and the shared one (3 matrices of hidden x I each)
"""

from __future__ import annotations

from collections import Counter

from model_folder.deepseek_v4_config import CSA, HCA, DeepseekV4Architecture


def _closed_entries(start: int, tokens: int, rate: int) -> int:
    """sum over positions p in [start, start + tokens) of (p + 1) // rate."""
    def prefix(n: int) -> int:  # sum over q in 1..n of q // rate
        full, rest = divmod(n, rate)
        return rate * full * (full - 1) // 2 + full * (rest + 1)
    return prefix(start + tokens) - prefix(start)


def chunk_flops(arch: DeepseekV4Architecture, start: int, tokens: int) -> Counter[str]:
    """FLOPs of one chunk of `tokens` tokens at positions start .., per component."""
    flops: Counter[str] = Counter()
    hidden, heads, dim = arch.hidden_size, arch.num_attention_heads, arch.head_dim
    hc_width = arch.hc_mult * hidden
    for layer_type, mlp_type in zip(arch.layer_types, arch.mlp_layer_types):
        flops["mhc"] += 2 * tokens * hc_width * (2 + arch.hc_mult) * arch.hc_mult * 2
        flops["projections"] += 2 * tokens * (hidden * arch.q_lora_rank + arch.q_lora_rank * heads * dim
                                              + hidden * dim + heads * dim * arch.o_lora_rank
                                              + arch.o_groups * arch.o_lora_rank * hidden)
        keys = tokens * arch.sliding_window
        if layer_type == CSA:
            index_heads, index_dim = arch.index_n_heads, arch.index_head_dim
            flops["compressor"] += 2 * tokens * hidden * (2 * 2 * dim + 2 * 2 * index_dim)
            flops["indexer projections"] += 2 * tokens * (arch.q_lora_rank * index_heads * index_dim
                                                          + hidden * index_heads)
            flops["indexer scores"] += 2 * index_heads * index_dim * _closed_entries(start, tokens, arch.compress_rate(CSA))
            keys += tokens * arch.index_topk
        elif layer_type == HCA:
            flops["compressor"] += 2 * tokens * hidden * 2 * dim
            keys += _closed_entries(start, tokens, arch.compress_rate(HCA))
        flops["attention core"] += 2 * 2 * heads * dim * keys
        experts = arch.num_experts_per_tok + 1  # routed + shared
        flops["moe"] += 2 * tokens * (hidden * arch.n_routed_experts + experts * 3 * hidden * arch.moe_intermediate_size)
    flops["mhc"] += 2 * tokens * hc_width * arch.hc_mult
    return flops


def prefill_flops(arch: DeepseekV4Architecture, length: int, chunk: int) -> Counter[str]:
    total: Counter[str] = Counter()
    for start in range(0, length, chunk):
        total.update(chunk_flops(arch, start, min(chunk, length - start)))
    return total
