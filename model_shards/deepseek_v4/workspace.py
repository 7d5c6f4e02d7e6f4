"""Large temporaries whose size grows with the context, allocated at one fixed size.

Why: a long prompt's chunks ask the caching allocator for a little more each time (the indexer's
(queries, entries) scores grow with the entries E, their query block shrinks to keep them under
`block_elements`). A cached segment smaller than a request cannot serve it, so each chunk takes a
new segment and keeps the old ones cached; once the KV pools and those segments fill the GPU a
cudaMalloc fails, and the allocator frees every cached segment (synchronizing the device) and
retries. Session 5 saw chunks of a long V4 prompt take 2-4x their neighbours, with host time as
long as device time, on the paged and the in-memory path alike (docs/deepseek_v4.md).

`carve` takes every large temporary from a flat allocation of one size, the bound that already
limits it, so each chunk (and each layer) reuses the same cached segment. Small temporaries
(under an eighth of the bound) keep their exact size: they come and go without trouble.
"""

from __future__ import annotations

import math

import torch

SMALL_FRACTION = 8  # below capacity / SMALL_FRACTION elements a temporary keeps its own size


def carved_elements(needed: int, capacity: int) -> int:
    """Elements to allocate for a temporary of `needed` elements under a bound of `capacity`
    (0: no bound): the bound itself for a large one, else exactly what is needed."""
    if capacity <= 0 or needed > capacity or needed * SMALL_FRACTION < capacity:
        return needed
    return capacity


def carve(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, capacity: int) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`, the front of a flat allocation of
    `carved_elements` elements (the storage is freed with the tensor, as usual)."""
    needed = math.prod(shape)
    flat = torch.empty(carved_elements(needed, capacity), dtype=dtype, device=device)
    return flat[:needed].view(shape)
