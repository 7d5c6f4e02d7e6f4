"""V4's attention core for one chunk of one sequence, in torch; on a GPU the softmax is one Triton
kernel (sink_softmax.py, tested against `attend_torch`).

Each query at position p attends three key sets with one softmax, plus a per-head sink logit that
takes probability mass and gives no value (K = V throughout: one shared head, MQA):

    window       raw keys at positions p - W + 1 .. p                 (every layer)
    compressed   HCA: every entry w with (w + 1) * m <= p + 1           (dense, masked)
                 CSA: the indexer's top-k of those entries              (gathered per query)

Each query scores exactly its W window keys (a strided view, never a (queries x keys) band), and
queries run in blocks sized so that no float32 block of logits exceeds `block_elements`:
memory stays linear in the chunk length.

Region map of `window_keys` for a chunk of T queries starting at position n (w rows carried over):

    window_keys row:   0 ........ w-1 | w ........... w+T-1
    position:          n-w ...... n-1 | n ........... n+T-1
    query i (position n+i) reaches rows i+w-W+1 .. i+w (those that exist)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.deepseek_v4.entries import Entries
from model_shards.deepseek_v4.workspace import carve

# Elements of one float32 block of logits or indexer scores: 64 MiB on a CPU, 1 GiB on a GPU
# (where fewer, larger blocks keep kernel launches off the critical path).
BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
ALIGNED_KEYS = 16  # shared key counts the matmuls see are a multiple of this (aligned_rows)


def block_elements(device: torch.device) -> int:
    return BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])


@dataclass(frozen=True)
class CompressedKeys:
    """The compressed entries (E rows of head_dim, contiguous or on pages: entries.py) and which
    of them each query may attend: `selected` (T, k) indices with -1 for none (CSA: gathered by
    address), or else every entry closed at the query's position (HCA: read once, they are few),
    from the chunk's first position and the compress rate (host ints: no device sync)."""

    entries: Entries
    selected: torch.Tensor | None = None
    first_position: int = 0
    rate: int = 1


def sink_attention(q: torch.Tensor, window_keys: torch.Tensor, sliding_window: int,
                   compressed: CompressedKeys | None, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, heads, head_dim), window_keys (w + T, head_dim) -> (T, heads, head_dim)."""
    tokens, heads, _ = q.shape
    windows, reachable = _query_windows(window_keys, tokens, sliding_window)
    extra = 0 if compressed is None else _keys_per_query(compressed)
    block = max(1, block_elements(q.device) // (heads * (sliding_window + extra)))
    out = torch.empty_like(q)
    for start in range(0, tokens, block):
        stop = min(tokens, start + block)
        groups = [(windows[start:stop], reachable[start:stop])]
        if compressed is not None:
            groups.append(_compressed_group(compressed, start, stop))
        out[start:stop] = attend(q[start:stop], [g for g in groups if g[0].shape[-2]], sinks, scale)
    return out


def _keys_per_query(compressed: CompressedKeys) -> int:
    if compressed.selected is not None:
        return compressed.selected.shape[1]
    return compressed.entries.count


def _query_windows(window_keys: torch.Tensor, tokens: int, sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's W window rows as a strided view (T, W, head_dim), oldest first, and which of
    them exist (T, W): near the sequence start zero rows pad the front and are masked."""
    pad = sliding_window - 1 - (window_keys.shape[0] - tokens)  # w <= W - 1 rows were carried over
    padded = F.pad(window_keys, (0, 0, pad, 0))  # (W - 1 + T, D): query i's own row is W - 1 + i
    windows = padded.unfold(0, sliding_window, 1).transpose(1, 2)  # (T, W, D), no copy
    slot = torch.arange(sliding_window, device=window_keys.device)
    reachable = slot + torch.arange(tokens, device=window_keys.device)[:, None] >= pad  # (T, W)
    return windows, reachable


def _compressed_group(compressed: CompressedKeys, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    entries = compressed.entries
    if compressed.selected is not None:
        selected = compressed.selected[start:stop]  # (t, k)
        return entries.gather(selected.clamp(min=0)), selected >= 0  # (t, k, D), (t, k)
    first, rate = compressed.first_position, compressed.rate
    # Every block of the chunk reads the entries closed at the chunk's end, those a block's queries
    # cannot see yet masked: the kernels see one key count per chunk (a multiple of 16 for a full
    # chunk), where a count per block compiled new variants mid-prompt (sink_softmax.py).
    keys = aligned_rows(entries.read(0, entries.count))  # (K, D), K >= count: zero rows past it
    visible = (torch.arange(start, stop, device=keys.device) + first + 1) // rate  # (t,) <= count
    reachable = torch.arange(keys.shape[0], device=keys.device) < visible[:, None]
    return keys, reachable


def aligned_rows(keys: torch.Tensor) -> torch.Tensor:
    """keys (K, D) with zero rows appended up to a multiple of ALIGNED_KEYS. The logits (t, heads,
    K) and the probabilities times keys are matmuls whose rows are K long: cuBLAS's tensor-core
    kernels need each row 16-byte aligned, and a chunk ending at another count (a prompt's last
    chunk) ran the HCA core at about half speed. Zero keys are finite, and masked: probability 0."""
    pad = -keys.shape[0] % ALIGNED_KEYS
    return F.pad(keys, (0, 0, 0, pad)) if pad else keys


def _mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def attend(q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor,
           scale: float) -> torch.Tensor:
    """One softmax over every group's keys and the sink. Keys (K, D) are shared by the block's
    queries, (t, K, D) are per query; `allowed` (t, K) says which a query may attend."""
    return attend_fused(q, groups, sinks, scale) if q.is_cuda else attend_torch(q, groups, sinks, scale)


def attend_fused(q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """attend with the softmax as one kernel (sink_softmax.py), in place on the raw logits."""
    from model_shards.deepseek_v4.sink_softmax import sink_softmax_

    logits = [raw_logits(q, keys, block_elements(q.device)) for keys, _ in groups]
    probs = sink_softmax_(logits, [allowed for _, allowed in groups], sinks, scale)
    out = None
    for (keys, _), group_probs in zip(groups, probs):
        part = _weighted_sum(group_probs, keys)
        out = part if out is None else out + part
    return out


def attend_torch(q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor,
                 scale: float) -> torch.Tensor:
    logits = [_scores(q, keys) * scale + _mask_bias(allowed, keys.dtype)[:, None, :]
              for keys, allowed in groups]  # (t, heads, K) each
    sink = sinks.view(1, -1, 1).expand(q.shape[0], -1, 1)  # float32: the softmax runs in float32, as in HF
    combined = torch.cat([*logits, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1).to(q.dtype)
    out, offset = None, 0
    for (keys, _), group_logits in zip(groups, logits):
        width = group_logits.shape[-1]
        part = _weighted_sum(probs[..., offset:offset + width], keys)
        out, offset = part if out is None else out + part, offset + width
    return out


def raw_logits(q: torch.Tensor, keys: torch.Tensor, capacity: int) -> torch.Tensor:
    """(t, heads, K) contiguous q . k. Shared keys (HCA's closed entries) grow with the context and
    their block of queries shrinks to stay under `capacity` elements: carved at that one size, so
    every chunk reuses one cached segment (workspace.py); per-query key sets are fixed in size."""
    if keys.dim() != 2:
        return _scores(q, keys).contiguous()
    out = carve((q.shape[0], q.shape[1], keys.shape[0]), q.dtype, q.device, capacity)
    return torch.matmul(q, keys.T, out=out)


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if keys.dim() == 2:
        return torch.matmul(q, keys.T)  # (t, heads, K)
    return torch.einsum("thd,tkd->thk", q, keys)


def _weighted_sum(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if keys.dim() == 2:
        return torch.matmul(probs, keys)  # (t, heads, D)
    return torch.einsum("thk,tkd->thd", probs, keys)
