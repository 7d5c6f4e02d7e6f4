"""V4's KV compressor: gated pooling of every m source tokens into one attention entry.

    entry_w = kv_norm( sum_j softmax_j(gate_j + position_bias_j) * kv_j ),  then RoPE at w * m

with the softmax per channel over the window's slots (paper §2.3, eqs. 9-12 and 20-23).
- HCA (non-overlapping): the slots are window w's m tokens.
- CSA and its Lightning Indexer (overlapping): projections are 2 * dim wide. The first half of
  each token (Ca) feeds the *next* window's entry, the second half (Cb) its own, so entry w pools
  2m slots: Ca of window w - 1, then Cb of window w (window 0 has no predecessor: its Ca slots get
  gate -inf, weight 0). That is why CompressorState keeps the last closed window's Ca half.

An entry exists once its window has closed, and a query at position p sees entries w with
(w + 1) * m <= p + 1: exactly those folded after appending tokens 0..p.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from model_shards.deepseek_v4.entries import Entries
from model_shards.deepseek_v4.norms import RMSNorm
from model_shards.deepseek_v4.positions import span_positions
from model_shards.deepseek_v4.rope import InterleavedRotary, apply_interleaved_rotary
from model_shards.deepseek_v4.state import CompressorState
from model_shards.deepseek_v4.weights import CheckpointTensors

if TYPE_CHECKING:
    from model_shards.deepseek_v4.paged_decodes import DecodeWindows


class ClosedWindows(NamedTuple):
    """The windows one sequence's chunk closed, as the slots their entries pool."""

    state: CompressorState
    kv: torch.Tensor  # (closed, slots, dim)
    gate: torch.Tensor  # (closed, slots, dim), position bias added
    first_entry: int  # the entry index the first of them becomes


def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, without a copy for one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, dim: int, rate: int, overlapping: bool, eps: float, dtype: torch.dtype,
                 rotary: InterleavedRotary):
        super().__init__()
        self.dim, self.rate, self.overlapping = dim, rate, overlapping
        width = 2 * dim if overlapping else dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False, dtype=dtype)
        self.position_bias = nn.Parameter(torch.empty(rate, width, dtype=torch.float32))
        self.kv_norm = RMSNorm(dim, eps)
        self.rotary = rotary

    def new_state(self, dtype: torch.dtype, device: torch.device) -> CompressorState:
        return CompressorState.empty(self.rate, self.dim, self.kv_proj.out_features, dtype, device)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-wise part: x (T, hidden) -> kv, gate logits (T, width) each. Several sequences'
        tokens are projected at once, then each sequence's rows appended to its own state."""
        return self.kv_proj(x), self.gate_proj(x)

    def append(self, states: list[CompressorState], kv: list[torch.Tensor],
               gate: list[torch.Tensor]) -> list[Entries]:
        """Fold each sequence's projected chunk (its rows of `project`: (T_i, width) each) into its
        own state; return each one's entries so far (E_i rows of dim, contiguous or on pages:
        entries.py). The windows the chunks close are pooled in one pass (pooling is per window)."""
        closing = []  # the sequences whose chunks close windows
        for state, chunk_kv, chunk_gate in zip(states, kv, gate):
            windows_kv, windows_gate, first_entry = state.close_windows(chunk_kv, chunk_gate)
            if windows_kv.shape[0]:
                closing.append(ClosedWindows(state, *self._slots(state, windows_kv, windows_gate), first_entry))
        if closing:
            sizes = [closed.kv.shape[0] for closed in closing]
            entry_indices = span_positions([(closed.first_entry, size) for closed, size in zip(closing, sizes)],
                                           closing[0].kv.device)
            pooled = self._pool(joined([closed.kv for closed in closing]), joined([closed.gate for closed in closing]),
                                entry_indices * self.rate)  # (windows of all sequences, dim)
            for closed, entries in zip(closing, pooled.split(sizes)):
                closed.state.add_entries(entries)
        return [state.entries for state in states]

    def append_decodes(self, windows: DecodeWindows, kv: torch.Tensor, gate: torch.Tensor) -> None:
        """N decodes' projected rows (N, width) into their open windows on the pages
        (paged_decodes.py); the windows that close (those whose m-th row this is) pooled and
        written to their entries' pages. The same fold as `append`, with no op per request."""
        closed_kv, closed_gate = windows.append(kv, gate)  # (C, m, width) each
        closed_gate = closed_gate + self.position_bias
        if self.overlapping:  # [Ca of the previous window | Cb], as _overlapping_slots
            dim = self.dim
            previous_kv, previous_gate = windows.swap_overlap(closed_kv[..., :dim], closed_gate[..., :dim])
            closed_kv = torch.cat((previous_kv.to(kv.dtype), closed_kv[..., dim:]), dim=1)  # (C, 2m, dim)
            closed_gate = torch.cat((previous_gate.to(closed_gate.dtype), closed_gate[..., dim:]), dim=1)
        windows.write_entries(self._pool(closed_kv, closed_gate, windows.entry_positions))

    def _slots(self, state: CompressorState, kv: torch.Tensor,
               gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's closed windows (closed, m, width) -> the slots each entry pools, with the
        position bias on the gates: (closed, m, dim), or overlapping (closed, 2m, dim)."""
        gate = gate + self.position_bias  # (closed, m, width)
        return self._overlapping_slots(state, kv, gate) if self.overlapping else (kv, gate)

    def _pool(self, kv: torch.Tensor, gate: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Slots (windows, slots, dim) -> entries (windows, dim), rotated at `positions` (windows,)."""
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)  # per channel
        pooled = self.kv_norm((kv * weights).sum(dim=1))  # (windows, dim)
        cos, sin = self.rotary.cos_sin(positions)
        return apply_interleaved_rotary(pooled, cos, sin)

    def _overlapping_slots(self, state: CompressorState, kv: torch.Tensor,
                           gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(closed, m, 2 dim) projections -> (closed, 2m, dim) slots: [Ca of the previous window | Cb]."""
        dim = self.dim
        if state.overlap_kv is None:  # the sequence's first window: nothing before it
            first_kv = kv.new_zeros(1, self.rate, dim)
            first_gate = gate.new_full((1, self.rate, dim), float("-inf"))
        else:
            first_kv, first_gate = state.overlap_kv[None].to(kv.dtype), state.overlap_gate[None].to(gate.dtype)
        previous_kv = torch.cat((first_kv, kv[:-1, :, :dim]))  # (closed, m, dim)
        previous_gate = torch.cat((first_gate, gate[:-1, :, :dim]))
        state.overlap_kv, state.overlap_gate = kv[-1, :, :dim].clone(), gate[-1, :, :dim].clone()
        if state.sink is not None:  # (closed, m, dim) halves: a resume after window w starts from w's
            state.sink.windows_closed(state.num_entries, kv[:, :, :dim], gate[:, :, :dim])
        return (torch.cat((previous_kv, kv[..., dim:]), dim=1),  # (closed, 2m, dim)
                torch.cat((previous_gate, gate[..., dim:]), dim=1))

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        reader.copy_into(self.kv_proj.weight.data, prefix + "wkv.weight")
        reader.copy_into(self.gate_proj.weight.data, prefix + "wgate.weight")
        reader.copy_into(self.position_bias.data, prefix + "ape")
        self.kv_norm.load(reader, prefix + "norm.weight")
