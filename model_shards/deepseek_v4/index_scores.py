"""Lightning Indexer scores of a block of queries against the compressed index keys.

    score(t, e) = sum_h w[t, h] * ReLU(q[t, h] . k[e])     -inf where entry e is not closed at t

(w already carries the 1/sqrt(heads) and 1/sqrt(head_dim) scales.) The ReLU sits between the dot
product and the head sum, so the sum cannot fold into one matmul: computed naively it passes a
(queries, heads, entries) float32 tensor through memory, heads = 64 times the output. At 128K
tokens that is ~0.5 TB a CSA layer, where the dot products themselves are ~35 TFLOP.

- `index_scores_torch` is that naive form in float32, in query blocks that bound the
  intermediate: the reference, and the path for float32 models and CPUs.
- `index_scores_triton` fuses it: one program per (queries x entries) tile loops over heads with
  one tensor-core dot each (bf16 in, float32 accumulate: the products of bf16 values are exact in
  float32, so it differs from the reference by summation order only) and keeps the head sum in
  registers. Tiles wholly after the block's last visible entry are filled with -inf unscored.
  It reads the keys where they lie: on the engine's pages through the request's block table
  (entries.py), so no chunk copies the indexer keys out of the pages.

Top-k selection ranks int64 keys `ordered(score) << 32 | (E - 1 - entry)`: the high word orders as
the float32 score does (-0.0 as 0.0, -inf lowest), the low word puts earlier entries first among
equal scores (indexer.top_k_earliest_first says why). With `ranked=True` the kernel writes these
keys directly, saving the passes over the (t, E) scores that encoding them costs.

`decode_index_scores` scores a decode step: N requests' single queries, each against its own E_i
entries, into one (N, E_max) block, -inf past E_i (so the lowest ranking keys: one top-k over the
block picks each row's min(topk, E_i) entries first). On a GPU one launch of the decode kernel
over all requests' entries as one row space (their block tables concatenated); on a CPU the
reference per row, the same ops as a one-token chunk's scores.
"""

from __future__ import annotations

import torch

from model_shards.deepseek_v4.entries import ContiguousEntries, Entries, PagedEntries
from model_shards.device import host_to_device
from model_shards.deepseek_v4.sink_attention import block_elements
from model_shards.deepseek_v4.workspace import carve

BLOCK_TOKENS, BLOCK_ENTRIES, WARPS = 64, 128, 4  # tile of one program; see bench/deepseek_v4.py
DECODE_BLOCK_TOKENS = 16  # a decode step's one query would waste 63 of 64 rows


def index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: Entries, first_position: int,
                 rate: int, ranked: bool = False) -> torch.Tensor:
    """q (t, heads, dim), head_weights (t, heads) float32, E keys of dim (contiguous or on pages:
    entries.py) for queries at positions first_position .. -> scores (t, E) float32, entries not
    closed at a query's position -inf; or with `ranked` their ranking keys (t, E) int64."""
    if fused_kernel_runs(q, keys.dtype):
        block_tokens = DECODE_BLOCK_TOKENS if q.shape[0] <= DECODE_BLOCK_TOKENS else BLOCK_TOKENS
        return index_scores_triton(q, head_weights, keys, first_position, rate, block_tokens, ranked=ranked)
    scores = index_scores_torch(q, head_weights, keys.read(0, keys.count), first_position, rate)
    return ranking_keys(scores) if ranked else scores


def ranking_keys(scores: torch.Tensor) -> torch.Tensor:
    """(t, E) float32 scores -> (t, E) int64 keys: larger key = higher score, then earlier entry."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which it equals
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # as float order, -inf lowest
    entry = torch.arange(scores.shape[-1] - 1, -1, -1, device=scores.device)
    return (ordered << 32) | entry


def fused_kernel_runs(q: torch.Tensor, keys_dtype: torch.dtype) -> bool:
    half = (torch.bfloat16, torch.float16)
    dim = q.shape[-1]
    return q.is_cuda and q.dtype in half and keys_dtype == q.dtype and dim >= 16 and dim & (dim - 1) == 0


def index_scores_torch(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, first_position: int,
                       rate: int) -> torch.Tensor:
    tokens, heads, _ = q.shape
    keys32 = keys.float()
    scores = torch.empty(tokens, keys.shape[0], dtype=torch.float32, device=q.device)
    block = max(1, block_elements(q.device) // max(1, heads * keys.shape[0]))
    for start in range(0, tokens, block):  # (t, heads, E) float32 in bounded blocks
        stop = min(tokens, start + block)
        scores[start:stop] = _weighted_relu_sum(q[start:stop], head_weights[start:stop], keys32)
    return scores.masked_fill_(~_closed(tokens, keys.shape[0], first_position, rate, q.device), float("-inf"))


def _weighted_relu_sum(q: torch.Tensor, head_weights: torch.Tensor, keys32: torch.Tensor) -> torch.Tensor:
    """(t, heads, dim) queries, (t, heads) weights, (E, dim) float32 keys -> (t, E) float32 scores."""
    per_head = torch.matmul(q.float(), keys32.T).relu_()  # (t, heads, E)
    return torch.bmm(head_weights[:, None, :], per_head)[:, 0]


def _closed(tokens: int, entries: int, first_position: int, rate: int, device: torch.device) -> torch.Tensor:
    """(t, E) bool: entry e is closed at query t (position first_position + t)."""
    visible = (torch.arange(first_position, first_position + tokens, device=device) + 1) // rate
    return torch.arange(entries, device=device) < visible[:, None]


def index_scores_triton(q: torch.Tensor, head_weights: torch.Tensor, keys: Entries | torch.Tensor,
                        first_position: int, rate: int, block_tokens: int = BLOCK_TOKENS,
                        block_entries: int = BLOCK_ENTRIES, warps: int = WARPS, ranked: bool = False) -> torch.Tensor:
    """The kernel reads keys where they lie, through their block table (a tensor: one block)."""
    from model_shards.deepseek_v4.index_scores_kernel import launch_index_scores

    keys = ContiguousEntries(keys) if isinstance(keys, torch.Tensor) else keys
    blocks, table, rows_per_block = keys.addressed()  # (num_blocks, rows, dim), (blocks,) long
    tokens, heads, dim = q.shape
    if blocks.shape[2] != dim or head_weights.shape != (tokens, heads) or q.stride(2) != 1 or blocks.stride(2) != 1:
        raise ValueError(f"index_scores: q {tuple(q.shape)}, keys {tuple(blocks.shape)} and head weights "
                         f"{tuple(head_weights.shape)} disagree, or a last dimension is strided")
    # One size for every chunk's block of scores (workspace.py: no allocator churn as E grows)
    scores = carve((tokens, keys.count), torch.int64 if ranked else torch.float32, q.device,
                   block_elements(q.device) if q.is_cuda else 0)
    if tokens and keys.count:
        launch_index_scores(q, head_weights.float().contiguous(), (blocks, table, rows_per_block), scores,
                            first_position, rate, block_tokens, block_entries, warps)
    return scores


def decode_index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: list[Entries],
                        ranked: bool = False, block_entries: int = BLOCK_ENTRIES) -> torch.Tensor:
    """q (N, heads, dim) and head_weights (N, heads) float32 of N decodes, keys[i] request i's
    E_i keys (all closed at its query) -> scores (N, max E_i) float32, -inf past E_i; or with
    `ranked` their ranking keys (N, max E_i) int64."""
    widest = max(entries.count for entries in keys)
    if fused_kernel_runs(q, keys[0].dtype) and all(entries.dtype == q.dtype for entries in keys):
        return decode_index_scores_triton(q, head_weights, keys, ranked, block_entries)
    scores = torch.full((q.shape[0], widest), float("-inf"), dtype=torch.float32, device=q.device)
    for row, entries in enumerate(keys):  # as index_scores_torch scores a one-token chunk
        scores[row, :entries.count] = _weighted_relu_sum(q[row:row + 1], head_weights[row:row + 1],
                                                         entries.read(0, entries.count).float())[0]
    return ranking_keys(scores) if ranked else scores


def decode_index_scores_triton(q: torch.Tensor, head_weights: torch.Tensor, keys: list[Entries],
                               ranked: bool = False, block_entries: int = BLOCK_ENTRIES) -> torch.Tensor:
    """decode_index_scores by the kernel: one launch over every request's entries."""
    row_space, first_rows = _one_row_space(keys)
    counts = [entries.count for entries in keys]
    return decode_index_scores_on_rows(q, head_weights, row_space, host_to_device(first_rows, q.device),
                                       host_to_device(torch.tensor(counts), q.device), max(counts), ranked,
                                       block_entries)


def decode_index_scores_on_rows(q: torch.Tensor, head_weights: torch.Tensor,
                                row_space: tuple[torch.Tensor, torch.Tensor, int], first_rows: torch.Tensor,
                                counts: torch.Tensor, widest: int, ranked: bool = False,
                                block_entries: int = BLOCK_ENTRIES) -> torch.Tensor:
    """The decode kernel's one launch: query i against rows first_rows[i] .. + counts[i] - 1 (device
    tensors (N,)) of one row space (blocks, table, rows_per_block) -> (N, widest), -inf past counts[i]."""
    from model_shards.deepseek_v4.index_scores_kernel import launch_decode_index_scores

    scores = torch.empty(q.shape[0], widest, dtype=torch.int64 if ranked else torch.float32, device=q.device)
    if widest:
        launch_decode_index_scores(q, head_weights.float().contiguous(), row_space, first_rows, counts, scores,
                                   block_entries, WARPS)
    return scores


def gathered_index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor,
                          ranked: bool = False) -> torch.Tensor:
    """N single queries q (N, heads, dim), head_weights (N, heads) float32, each against its own
    keys (N, E, dim) of which `allowed` (N, E) exist -> scores (N, E) float32, -inf where not
    allowed (or their ranking keys): decode_index_scores' reference on keys gathered at once."""
    per_head = torch.matmul(q.float(), keys.float().transpose(1, 2)).relu_()  # (N, heads, E)
    scores = torch.bmm(head_weights[:, None, :], per_head)[:, 0].masked_fill_(~allowed, float("-inf"))
    return ranking_keys(scores) if ranked else scores


def _one_row_space(keys: list[Entries]) -> tuple[tuple[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """Every request's entries as rows of one (blocks, table, rows_per_block) and each request's
    first row (N,) on the host. Pages of one field: the block tables side by side (no entry
    copied). Anything else (contiguous tensors): the entries concatenated into one block."""
    first = keys[0]
    if all(isinstance(entries, PagedEntries) and _same_view(entries.view, first.view) for entries in keys):
        tables = [entries.rows.table for entries in keys]
        offsets = torch.tensor([0] + [table.shape[0] for table in tables[:-1]]).cumsum(0)
        return (first.view, torch.cat(tables), first.rows.rows_per_block), offsets * first.rows.rows_per_block
    rows = ContiguousEntries(torch.cat([entries.read(0, entries.count) for entries in keys]))
    offsets = torch.tensor([0] + [entries.count for entries in keys[:-1]]).cumsum(0)
    return rows.addressed(), offsets


def _same_view(view: torch.Tensor, other: torch.Tensor) -> bool:
    return view.data_ptr() == other.data_ptr() and view.shape == other.shape and view.stride() == other.stride()
