"""How a worker's host KV memory splits into slots: what the driver and the worker must agree on.

A dense model's host tier is one pool of block slots. A hybrid model (DeepSeek-V4) keeps the
part of a block that every restore reads (its compressed entries) apart from the part that only
the restore's last block needs (its window part: raw window keys, most of the bytes): a small
second pool holds window parts, about two for every `interval_blocks` blocks (a checkpoint every
`interval_blocks` blocks and the last blocks of each sequence). Slot ids are one space: block
slots first, then window-part slots (`num_blocks + i`), so transfer ops name either kind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostSlots:
    num_blocks: int  # slots of block_nbytes: ids 0 .. num_blocks - 1
    num_window_parts: int  # slots of window_nbytes: ids num_blocks .. num_blocks + num_window_parts - 1


def split_host_bytes(host_bytes: int, block_nbytes: int, window_nbytes: int = 0,
                     interval_blocks: int = 1) -> HostSlots:
    """Slots of both kinds in `host_bytes` (no window parts without `window_nbytes`)."""
    if block_nbytes <= 0:
        return HostSlots(0, 0)
    if window_nbytes <= 0:
        return HostSlots(host_bytes // block_nbytes, 0)
    # Two window parts per interval (the checkpoints, and as many sequence ends again), at most
    # one per block.
    parts_per_block = min(1.0, 2 / interval_blocks)
    num_blocks = int(host_bytes // (block_nbytes + parts_per_block * window_nbytes))
    num_window_parts = (host_bytes - num_blocks * block_nbytes) // window_nbytes
    if num_window_parts == 0 and host_bytes >= block_nbytes + window_nbytes:
        num_blocks = (host_bytes - window_nbytes) // block_nbytes  # a restore needs one window part at least
        num_window_parts = 1
    if num_window_parts == 0:  # blocks no restore could end at
        return HostSlots(0, 0)
    return HostSlots(num_blocks, num_window_parts)
