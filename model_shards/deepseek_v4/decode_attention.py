"""V4's attention core for many single-query segments at once: a decode step of N requests.

`sink_attention` runs one sequence's chunk; a decode step would run it N times with one query each
(every kernel launched N times: launch-bound on a GPU). Here each query's keys are gathered into
one padded block and attended with ONE `sink_attention.attend` (the same logits, sink and
softmax; the same kernel on a GPU):

    query i (its sequence at position p_i):  keys_i = [window rows p_i - W + 1 .. p_i | compressed]
        compressed   CSA: its top-k entries, gathered by address    HCA: every entry closed at p_i
    keys (N, K_max, D): the keys_i side by side;   allowed (N, K_max): column < len(keys_i)

A single query has no NO_ENTRY slot to mask: it ranks every entry closed at its position, which
are all its sequence's entries, and the indexer keeps min(topk, E) of them; so lengths alone make
the mask. Padding columns repeat a real row (finite: a masked key gets probability exactly 0).

On the pages (paged_decodes.py) the keys arrive already gathered per query, (N, W, D) window rows
and (N, K, D) compressed entries, each with its (N, K) mask: `paged_decode_attention` attends them
as two groups of the same softmax, with no op per query.
"""

from __future__ import annotations

import torch

from model_shards.device import host_to_device
from model_shards.deepseek_v4.sink_attention import CompressedKeys, attend, block_elements


def decode_attention(q: torch.Tensor, keys: list[tuple[torch.Tensor, CompressedKeys | None]],
                     sliding_window: int, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q (N, heads, head_dim), one query per segment; keys[i]: segment i's window keys (w + 1,
    head_dim) as SlidingWindowState.append returned them, and its compressed keys -> (N, heads, head_dim)."""
    per_query = [_query_keys(window_keys, compressed, sliding_window) for window_keys, compressed in keys]
    widest = max(sum(piece.shape[0] for piece in pieces) for pieces in per_query)
    block = max(1, block_elements(q.device) // (q.shape[1] * widest))  # queries per block of logits
    outs = [_attend_padded(q[first:first + block], per_query[first:first + block], sinks, scale)
            for first in range(0, q.shape[0], block)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def paged_decode_attention(q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q (N, heads, head_dim), one query per decode; groups [(keys (N, K_g, head_dim), allowed
    (N, K_g))]: each decode's window keys, then its compressed keys -> (N, heads, head_dim)."""
    groups = [(keys, allowed) for keys, allowed in groups if keys.shape[1]]
    widest = sum(keys.shape[1] for keys, _ in groups)
    block = max(1, block_elements(q.device) // (q.shape[1] * widest))  # queries per block of logits
    if block >= q.shape[0]:
        return attend(q, groups, sinks, scale)
    return torch.cat([attend(q[first:first + block], [(keys[first:first + block], allowed[first:first + block])
                                                      for keys, allowed in groups], sinks, scale)
                      for first in range(0, q.shape[0], block)])


def _query_keys(window_keys: torch.Tensor, compressed: CompressedKeys | None,
                sliding_window: int) -> list[torch.Tensor]:
    """The rows one query attends, in pieces: its window (<= W rows, its own key last), then its
    compressed keys."""
    window = window_keys[-sliding_window:]
    if compressed is None:
        return [window]
    if compressed.selected is not None:  # (1, k) of entries < E
        return [window, compressed.entries.gather(compressed.selected[0])]  # (k, D)
    closed = (compressed.first_position + 1) // compressed.rate
    return [window, compressed.entries.read(0, closed)]  # (E, D)


def _attend_padded(q: torch.Tensor, per_query: list[list[torch.Tensor]], sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """(n, heads, D) queries against their own keys, padded into one (n, K_max, D) block."""
    flat = torch.cat([piece for pieces in per_query for piece in pieces])  # (sum K_i, D)
    index, allowed = _padding([sum(piece.shape[0] for piece in pieces) for pieces in per_query], q.device)
    keys = flat.index_select(0, index.flatten()).view(*index.shape, flat.shape[-1])  # (n, K_max, D)
    return attend(q, [(keys, allowed)], sinks, scale)


def _padding(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the concatenated keys for each query's columns, and which columns hold one of its
    keys: (n, K_max) each, built on the host (no device op per query)."""
    counts = torch.tensor(lengths)
    columns = torch.arange(max(lengths))
    allowed = columns < counts[:, None]
    index = torch.where(allowed, (counts.cumsum(0) - counts)[:, None] + columns, 0)
    return host_to_device(index, device), host_to_device(allowed, device)
