"""The indexer's earliest-first top-k from float32 scores, without int64 ranking keys.

`indexer.top_k_of_ranking` takes one top-k over int64 keys `ordered(score) << 32 | (E - 1 - entry)`
(index_scores.py): exact and simple, but every score becomes 8 bytes, and a radix select over
64-bit keys takes twice the passes of one over 32-bit values. At 1M tokens a CSA layer ranks
16K queries x 262K entries a chunk (2^28 scores a block of queries): session 11's profile of the
last 1M chunk on an H100 spent 113 ms in top-k, the second largest section after attention.

Here the same choice in float32 (t, E) scores:

    kth       the k-th largest score of each row (one float32 top-k: its values only)
    above     scores > kth                       every one of them is chosen (fewer than k)
    ties      scores == kth                      the earliest k - |above| of them are chosen
    chosen    above | ties whose running count (left to right) is within k - |above|
    indices   the chosen entries' columns, row by row (nonzero_static, its size known: t x k):
              ascending, as `top_k_of_ranking` returns them

Equal to `top_k_of_ranking(ranking_keys(scores), k)` for every input without NaN: a score equal
to the k-th is tied with it as the int64 key's high word says (-0.0 == 0.0 in both; -inf rows of
entries not closed yet tie among themselves and go earliest first, as their keys do). ReLU makes
ties common (an entry every head scores below zero gets exactly 0), which is why ties are
resolved, not left to topk's order. The passes: one float32 top-k, elementwise compares, one int32
running count of the ties and a stream compaction over (t, E): no 8-byte tensor of E columns.

Not wired into the layers yet: `bench/deepseek_v4_top_k.py` times it against the int64 path on
a GPU first (the `topk` stage of bench/gpu_open_figures.sh).
"""

from __future__ import annotations

import torch


def top_k_by_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(t, E) float32 scores -> (t, k) int64 entry indices, ascending: each row's k largest
    scores, ties at the k-th going to the earliest entries. k <= E."""
    rows = scores.shape[0]
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.long, device=scores.device)
    kth = scores.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # (t, 1)
    chosen = _chosen(scores, kth, k)  # (t, E) bool, exactly k True a row
    # Row-major: row by row, each row's columns ascending. The size is known (t * k), so no host
    # sync (nonzero's output size would need one) and nothing (t, E)-wide in int64.
    return torch.nonzero_static(chosen, size=rows * k)[:, 1].view(rows, k)


def _chosen(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Every score above the row's k-th, then its ties with the k-th from the left until k."""
    above = scores > kth
    ties = scores == kth
    wanted = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)  # (t, 1), >= 1
    tie_rank = ties.cumsum(dim=-1, dtype=torch.int32)  # (t, E) ties up to and including this entry
    return above | (ties & (tie_rank <= wanted))
