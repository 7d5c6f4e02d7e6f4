"""What a model worker tells the driver once, at start-up, about its KV cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerDescription:
    """Rank 0's facts; every rank allocated alike (the block count is the world's minimum)."""

    num_kv_blocks: int
    kv_layout: str  # dtype, block size, parallel layout and this rank's place in it
    kv_block_nbytes: int  # bytes of one block on one rank: sizes the host tier in blocks
    dtype: str = ""  # of the weights and KV cache as loaded ("bfloat16"), for the start-up summary
    device: str = ""  # rank 0's ("cuda:0", "cpu")
    # A hybrid model's other KV block groups (kvcache/block_groups.py), in order: blocks of each.
    extra_group_blocks: tuple[int, ...] = ()
    # A hybrid model's window part of one block (kv_block_nbytes is then the rest): kept in its own
    # host pool, read only where a restore ends (protocol/host_slots.py).
    kv_window_nbytes: int = 0
