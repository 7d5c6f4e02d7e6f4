"""Every matmul kernel a step may pick, run once at start-up instead of inside a request.

Why: a prompt of a token count the process has not multiplied before took 5-8 ms longer than
the same count again (H200, session 5: 0.019 against 0.011 s at 4000 tokens on FlashAttention-2;
transformers, warmed on other lengths, 0.011 s). Under the profiler the new count's GEMMs cost
~1 ms of host time each, and CUDA's lazy module loading loaded kernels ("Lazy Function Loading")
inside the request: cuBLAS picks its kernel by the row count M, and each kernel's module loads at
its first use. Multiplying each distinct weight of one layer, and the output head, over a ladder
of row counts that covers every step size loads those kernels at start-up (tens of ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LADDER_RATIO = 1.5  # neighbouring row counts differ by at most this factor


def row_count_ladder(largest: int, smallest: int = 1) -> list[int]:
    """smallest, then x1.5 steps rounded to multiples of 8 where that is coarser, up to and
    including `largest`: the row counts a step of 1 .. largest tokens is warmed at."""
    counts, count = [], max(1, smallest)
    while count < largest:
        counts.append(count)
        grown = max(count + 1, int(count * LADDER_RATIO))
        count = grown if grown < 16 else -(-grown // 8) * 8
    return counts + [largest]


def distinct_linears(module: nn.Module) -> list[nn.Linear]:
    """One nn.Linear per (input, output, dtype) shape among a module's submodules."""
    seen, linears = set(), []
    for child in module.modules():
        if isinstance(child, nn.Linear):
            shape = (child.in_features, child.weight.shape[0], child.weight.dtype)
            if shape not in seen:
                seen.add(shape)
                linears.append(child)
    return linears


@torch.inference_mode()
def warm_up_matmuls(weights: list[torch.Tensor], row_counts: list[int]) -> int:
    """x (M, in) @ weight.T for every weight (out, in) and M in row_counts -> how many ran.
    Plain F.linear on this rank's weight shard: no collectives, whatever the parallel layout."""
    calls = 0
    for weight in weights:
        x = torch.zeros(max(row_counts), weight.shape[1], dtype=weight.dtype, device=weight.device)
        for rows in row_counts:
            F.linear(x[:rows], weight)
            calls += 1
    return calls
