"""Reference paged attention in plain torch (CPU and GPU): gather, then scaled_dot_product_attention.

Correct for every batch shape and slow on purpose-built hardware (a Python loop over sequences,
a gathered copy of each context per layer); fast kernels implement the same interface and are
tested against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model_shards.attention.base import AttentionBackend, AttentionMetadata, write_kv

# Decode (one query, no mask) avoids cuDNN: it builds an execution plan per (queries, context
# length) shape, and the context grows by one token every step. Measured on an H100: ~70 ms of
# host time per new shape, which made decode 20x slower (bench/engine_gpu.py --profile-block-size).
# Prefill chunks keep torch's choice: with a mask and GQA only cuDNN avoids materialising scores.
_DECODE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_PREFILL_KERNELS = [SDPBackend.CUDNN_ATTENTION, *_DECODE_KERNELS]


class TorchSDPABackend(AttentionBackend):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        write_kv(layer_cache, key, value, metadata.slot_mapping)
        output = torch.empty_like(query)  # (T, heads, head_dim)
        for i in range(metadata.num_seqs):
            start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
            context_key, context_value = gather_context(layer_cache, metadata, i)
            output[start:end] = attend(query[start:end], context_key, context_value, scale)
        return output


def gather_context(layer_cache: torch.Tensor, metadata: AttentionMetadata,
                   seq_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence i's keys and values, (context_len, kv_heads, head_dim) each, in position order."""
    num_blocks = metadata.num_blocks_of(seq_index)
    block_ids = metadata.block_table_tensor[seq_index, :num_blocks]  # (num_blocks,)
    blocks = layer_cache[block_ids]  # (num_blocks, 2, block_size, kv_heads, head_dim)
    context_len = metadata.context_lens[seq_index]
    keys = blocks[:, 0].flatten(0, 1)[:context_len]  # (context_len, kv_heads, head_dim)
    values = blocks[:, 1].flatten(0, 1)[:context_len]
    return keys, values


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Causal attention of n queries that are the LAST n positions of a context of L keys.

    query (n, heads, head_dim), key/value (L, kv_heads, head_dim) -> (n, heads, head_dim).
    The mask is bottom-right aligned: query j sits at position L - n + j and sees keys
    0..L - n + j. One decode token (n = 1) sees everything, so it needs no mask.
    """
    n, context_len = query.shape[0], key.shape[0]
    mask = None
    if n > 1:
        mask = torch.ones(n, context_len, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=context_len - n)  # (n, L) True = may attend
    with sdpa_kernel(_DECODE_KERNELS if n == 1 else _PREFILL_KERNELS, set_priority=n > 1):
        output = F.scaled_dot_product_attention(
            query.transpose(0, 1).unsqueeze(0),  # (1, heads, n, head_dim)
            key.transpose(0, 1).unsqueeze(0),  # (1, kv_heads, L, head_dim)
            value.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return output.squeeze(0).transpose(0, 1)  # (n, heads, head_dim)
