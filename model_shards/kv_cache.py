"""The paged KV cache of one model rank: one tensor, block-major.

Layout (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), 2 = (key, value):
- all layers of one block are one contiguous piece, so spilling a block to host memory or Redis is
  one large copy (host<->device copies reach line rate only at >= 1 MiB pieces, and Redis
  keeps one value per block);
- within a layer, each block's (block_size, kv_heads, head_dim) tile is contiguous, so attention
  reads of a sequence's blocks stay coalesced.
A block id means the same slot range in every layer: slot = block_id * block_size + offset.
"""

from __future__ import annotations

import torch


class KVCacheTensors:
    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        # zeros, not empty: a never-written slot must not hold NaN bit patterns that a kernel
        # reading a whole tile could multiply by a zero attention weight
        self.data = torch.zeros(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def layer(self, index: int) -> torch.Tensor:
        """View (num_blocks, 2, block_size, kv_heads, head_dim) of one layer; no copy."""
        return self.data[:, index]

    def block(self, block_id: int) -> torch.Tensor:
        """The contiguous (num_layers, 2, block_size, kv_heads, head_dim) tensor of one block."""
        return self.data[block_id]

    @property
    def bytes_per_block(self) -> int:
        return self.data[0].numel() * self.data.element_size()
