"""V4's attention core for one chunk of one sequence, in plain torch (the reference a kernel is
tested against).

Each query at position p attends three key sets with one softmax, plus a per-head sink logit that
takes probability mass and gives no value (K = V throughout: one shared head, MQA):

    window       raw keys at positions p - W + 1 .. p                 (every layer)
    compressed   HCA: every entry w with (w + 1) * m <= p + 1           (dense, masked)
                 CSA: the indexer's top-k of those entries              (gathered per query)

Queries run in blocks sized so that no (queries x keys) float32 block exceeds
ATTENTION_BLOCK_ELEMENTS: a long prefill is linear in memory, never (tokens x tokens).

Region map of `window_keys` for a chunk of T queries starting at position n (w rows carried over):

    window_keys row:   0 ........ w-1 | w ........... w+T-1
    position:          n-w ...... n-1 | n ........... n+T-1
    query i (position n+i) reaches rows i+w-W+1 .. i+w
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ATTENTION_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class CompressedKeys:
    """The compressed entries (E, head_dim) and which of them each query may attend: `selected`
    (T, k) indices with -1 for none (CSA), or else every entry closed at the query's position
    (HCA), from the chunk's first position and the compress rate (host ints: no device sync)."""

    entries: torch.Tensor
    selected: torch.Tensor | None = None
    first_position: int = 0
    rate: int = 1


def sink_attention(q: torch.Tensor, window_keys: torch.Tensor, sliding_window: int,
                   compressed: CompressedKeys | None, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, heads, head_dim), window_keys (w + T, head_dim) -> (T, heads, head_dim)."""
    tokens, heads, _ = q.shape
    carried = window_keys.shape[0] - tokens
    extra = 0 if compressed is None else _keys_per_query(compressed)
    # a block of t queries scores about t * (t + W + extra) keys per head
    block = max(1, min(ATTENTION_BLOCK_ELEMENTS // (heads * (sliding_window + extra)),
                       math.isqrt(ATTENTION_BLOCK_ELEMENTS // heads)))
    out = torch.empty_like(q)
    for start in range(0, tokens, block):
        stop = min(tokens, start + block)
        groups = [_window_group(window_keys, carried, start, stop, sliding_window)]
        if compressed is not None:
            groups.append(_compressed_group(compressed, start, stop))
        out[start:stop] = _attend(q[start:stop], [g for g in groups if g[0].shape[-2]], sinks, scale)
    return out


def _keys_per_query(compressed: CompressedKeys) -> int:
    if compressed.selected is not None:
        return compressed.selected.shape[1]
    return compressed.entries.shape[0]


def _window_group(window_keys: torch.Tensor, carried: int, start: int, stop: int,
                  sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys rows lo .. hi-1 reachable from queries start .. stop-1, with the band mask (t, hi - lo)."""
    lo, hi = max(0, start + carried - sliding_window + 1), stop + carried
    row = torch.arange(lo, hi, device=window_keys.device)
    query = torch.arange(start, stop, device=window_keys.device)[:, None] + carried  # query's own row
    reachable = (row <= query) & (row > query - sliding_window)
    return window_keys[lo:hi], _mask_bias(reachable, window_keys.dtype)


def _compressed_group(compressed: CompressedKeys, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    entries = compressed.entries
    if compressed.selected is not None:
        selected = compressed.selected[start:stop]  # (t, k)
        return entries[selected.clamp(min=0)], _mask_bias(selected >= 0, entries.dtype)  # (t, k, D)
    first, rate = compressed.first_position, compressed.rate
    count = (first + stop) // rate  # entries closed at the block's last query
    visible = (torch.arange(start, stop, device=entries.device) + first + 1) // rate  # (t,)
    reachable = torch.arange(count, device=entries.device) < visible[:, None]
    return entries[:count], _mask_bias(reachable, entries.dtype)


def _mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _attend(q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor,
            scale: float) -> torch.Tensor:
    """One softmax over every group's keys and the sink. Keys (K, D) are shared by the block's
    queries, (t, K, D) are per query; biases (t, K) are 0 or -inf."""
    logits = [_scores(q, keys) * scale + bias[:, None, :] for keys, bias in groups]  # (t, heads, K) each
    sink = sinks.to(logits[0].dtype).view(1, -1, 1).expand(q.shape[0], -1, 1)
    combined = torch.cat([*logits, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1).to(q.dtype)
    out, offset = None, 0
    for (keys, _), group_logits in zip(groups, logits):
        width = group_logits.shape[-1]
        part = _weighted_sum(probs[..., offset:offset + width], keys)
        out, offset = part if out is None else out + part, offset + width
    return out


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if keys.dim() == 2:
        return torch.matmul(q, keys.T)  # (t, heads, K)
    return torch.einsum("thd,tkd->thk", q, keys)


def _weighted_sum(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if keys.dim() == 2:
        return torch.matmul(probs, keys)  # (t, heads, D)
    return torch.einsum("thk,tkd->thd", probs, keys)
