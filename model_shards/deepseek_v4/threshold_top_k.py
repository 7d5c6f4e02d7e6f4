"""The indexer's earliest-first top-k from float32 scores, without int64 ranking keys.

`indexer.top_k_of_ranking` takes one top-k over int64 keys `ordered(score) << 32 | (E - 1 - entry)`
(index_scores.py): exact and simple, but every score becomes 8 bytes, and a radix select over
64-bit keys takes twice the passes of one over 32-bit values. At 1M tokens a CSA layer ranks
16K queries x 262K entries a chunk (2^28 scores a block of queries): session 11's profile of the
last 1M chunk on an H100 spent 113 ms in top-k for its one CSA layer, next to 118 ms of scores.

Here the same choice in float32 (t, E) scores:

    values    one float32 top-k of each row (values only, unsorted)             (t, k)
    kth       the row's k-th largest score: the least of those values            (t,)
    wanted    k - |values > kth|: how many entries tied with kth it takes        (t,)
              (every score above kth is among the top-k values, so no pass over E counts them)
    columns   one pass over each row, left to right: an entry is chosen when its score is above
              kth, or equal to it and among the first `wanted` such; chosen columns are written
              in the order met, so ascending, as `top_k_of_ranking` returns them

Equal to `top_k_of_ranking(ranking_keys(scores), k)` for every input without NaN: a score equal
to the k-th is tied with it as the int64 key's high word says (-0.0 == 0.0 in both; -inf rows of
entries not closed yet tie among themselves and go earliest first, as their keys do). ReLU makes
ties common (an entry every head scores below zero gets exactly 0), which is why ties are
resolved, not left to topk's order.

The pass over a row is a Triton kernel on a GPU (`_chosen_columns`: one program a row, a running
count carried across tiles, scores read once); elsewhere torch ops (two int32 running counts and
a stream compaction over (t, E)). The k-th value comes from torch's float32 top-k (`topk`) or from
a radix select of our own (`radix`: four passes of 8-bit histograms a row, which also gives the
ties wanted); the bench times both before either becomes the layers'. Chosen by `model.deepseek_v4_index_top_k: threshold`
(kernel_choices.py); bench/deepseek_v4_top_k.py times it against the int64 path.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton

# Entries a program takes at once: fixed, not sized by the row, so that a prompt's growing entry
# count never selects another compiled variant (a compile inside a request; kernel_warmup.py).
ROW_TILE = 4096  # the row pass (one tl.cumsum)
RADIX_TILE = 2048  # a radix pass (one histogram)


def top_k_by_threshold(scores: torch.Tensor, k: int, kth_search: str = "topk") -> torch.Tensor:
    """(t, E) float32 scores -> (t, k) int64 entry indices, ascending: each row's k largest
    scores, ties at the k-th going to the earliest entries. k <= E. `kth_search`: how each row's
    k-th value is found, a name in KTH_SEARCHES."""
    if k == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    kth, wanted = KTH_SEARCHES[kth_search](scores, k)
    columns = chosen_columns_kernel if row_pass_kernel_runs(scores) else chosen_columns_torch
    return columns(scores, kth, wanted, k)


def row_pass_kernel_runs(scores: torch.Tensor) -> bool:
    """The Triton row pass on a GPU; torch ops elsewhere (the interpreter would be far slower)."""
    return scores.is_cuda


def kth_by_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k-th largest score (t,) and how many entries tied with it the top-k takes (t,)
    int32, from one float32 top-k of values: every score above the k-th is among them."""
    values = scores.topk(k, dim=-1, sorted=False).values  # (t, k)
    kth = values.amin(dim=-1)
    return kth, k - (values > kth[:, None]).sum(dim=-1, dtype=torch.int32)


def kth_by_radix(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kth_by_topk`'s answer by a radix select, one Triton program a row (interpreter without
    CUDA): four passes over the row, each a 256-bin histogram of the next 8 bits of the scores'
    order-preserving keys among those whose higher bits match the k-th's so far."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    rows, entries = scores.shape
    kth = torch.empty(rows, dtype=torch.float32, device=scores.device)
    wanted = torch.empty(rows, dtype=torch.int32, device=scores.device)
    _kth_largest[(rows,)](scores, kth, wanted, entries, scores.stride(0), k,
                          TILE=RADIX_TILE, num_warps=8)
    return kth, wanted


KTH_SEARCHES = {"topk": kth_by_topk, "radix": kth_by_radix}


def chosen_columns_torch(scores: torch.Tensor, kth: torch.Tensor, wanted: torch.Tensor, k: int) -> torch.Tensor:
    """The chosen columns (t, k) ascending by torch ops over (t, E)."""
    ties = scores == kth[:, None]
    tie_rank = ties.cumsum(dim=-1, dtype=torch.int32)  # (t, E) ties up to and including this entry
    chosen = (scores > kth[:, None]) | (ties & (tie_rank <= wanted[:, None]))  # exactly k a row
    # Row-major: row by row, columns ascending; the size is known (t * k), so no host sync.
    return torch.nonzero_static(chosen, size=scores.shape[0] * k)[:, 1].view(-1, k)


def chosen_columns_kernel(scores: torch.Tensor, kth: torch.Tensor, wanted: torch.Tensor, k: int) -> torch.Tensor:
    """The chosen columns (t, k) ascending, one Triton program a row (interpreter without CUDA)."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    rows, entries = scores.shape
    out = torch.empty(rows, k, dtype=torch.long, device=scores.device)
    _chosen_columns[(rows,)](scores, kth.float().contiguous(), wanted.to(torch.int32).contiguous(), out, entries,
                             scores.stride(0), out.stride(0), TILE=ROW_TILE,
                             num_warps=8)
    return out


# A row's entry count (and so its stride) grows with the prompt: unspecialized, one variant serves all.
LENGTHS = ["entries", "stride_row"]


@triton.jit(do_not_specialize=LENGTHS)
def _chosen_columns(scores_ptr, kth_ptr, wanted_ptr, out_ptr, entries, stride_row, stride_out, TILE: tl.constexpr):
    """One row: its chosen columns in the order met (above kth, or tied with it within `wanted`)."""
    row = tl.program_id(0)
    kth = tl.load(kth_ptr + row)
    wanted = tl.load(wanted_ptr + row)
    placed = tl.zeros([], dtype=tl.int32)  # chosen so far: the next one's slot
    ties_seen = tl.zeros([], dtype=tl.int32)
    for start in range(0, entries, TILE):
        columns = start + tl.arange(0, TILE)
        inside = columns < entries
        score = tl.load(scores_ptr + row * stride_row + columns, mask=inside, other=0.0)
        tie = inside & (score == kth)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0)  # ties up to and including this one
        take = (inside & (score > kth)) | (tie & (tie_rank <= wanted))
        slot = placed + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out_ptr + row * stride_out + slot, columns.to(tl.int64), mask=take)
        placed += tl.sum(take.to(tl.int32), 0)
        ties_seen += tl.sum(tie.to(tl.int32), 0)


@triton.jit
def _order_key(score):
    """float32 -> int64 in [0, 2^32), ordered as the scores (-0.0 as 0.0, -inf lowest)."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes 0.0
    signed = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 ordered as the floats
    return signed.to(tl.int64) + 2147483648


@triton.jit(do_not_specialize=LENGTHS + ["k"])
def _kth_largest(scores_ptr, kth_ptr, wanted_ptr, entries, stride_row, k, TILE: tl.constexpr):
    """One row's k-th largest score and how many of its ties the top-k takes (its rank among them)."""
    row = tl.program_id(0)
    bins = tl.arange(0, 512)  # 0..255 the digits, 256: entries outside the prefix or the row
    prefix = tl.zeros([], dtype=tl.int64)  # the k-th's key bits found so far
    rank = tl.zeros([], dtype=tl.int32) + k  # the k-th's rank, from the top, among the prefix's entries
    for digit_pass in tl.static_range(4):
        shift = 24 - 8 * digit_pass
        counts = tl.zeros([512], dtype=tl.int32)
        for start in range(0, entries, TILE):
            columns = start + tl.arange(0, TILE)
            inside = columns < entries
            key = _order_key(tl.load(scores_ptr + row * stride_row + columns, mask=inside, other=0.0))
            matches = inside & ((key >> (shift + 8)) == prefix)
            counts += tl.histogram(tl.where(matches, (key >> shift) & 255, 256).to(tl.int32), 512)
        counts = tl.where(bins < 256, counts, 0)
        from_top = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # (512,) entries in bins >= b
        digit = tl.sum((from_top >= rank).to(tl.int32), 0) - 1  # the lowest bin still holding the rank
        rank -= tl.sum(tl.where(bins == digit, from_top - counts, 0), 0)  # minus those in higher bins
        prefix = (prefix << 8) | digit.to(tl.int64)
    signed = (prefix - 2147483648).to(tl.int32)
    bits = tl.where(signed < 0, signed ^ 0x7FFFFFFF, signed)
    tl.store(kth_ptr + row, bits.to(tl.float32, bitcast=True))
    tl.store(wanted_ptr + row, rank)
