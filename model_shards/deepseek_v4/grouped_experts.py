"""Routed experts as grouped matmuls: no host sync, no Python loop over experts.

    rows      every (token, slot) pair of the routing, T * k of them, sorted by expert    (R, hidden)
    offsets   end row of each local expert's group, computed on the device                (E_local,)
    gate_up   grouped matmul rows @ gate_up[e]^T per group                                 (R, 2I)
    down      grouped matmul swiglu(gate_up) @ down[e]^T per group                        (R, hidden)

Rows routed to experts another rank holds (expert parallelism) sort after every local group: the
grouped matmul leaves them undefined and the combine masks them out. The combine puts rows back in
(token, slot) order and sums a token's k slots in float32, in slot order: deterministic, unlike an
atomic index_add.

`torch._grouped_mm` runs bf16 groups in one CUTLASS kernel on Hopper and has a looping fallback on
the CPU; elsewhere (float32 on a GPU) `grouped_linear` loops over groups itself, which needs the
offsets on the host (one sync: a float32 reference path, not the serving one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertRows:
    """Where each (token, slot) pair of a routing goes; all device tensors."""

    order: torch.Tensor  # (R,) flat (token * k + slot) index of each sorted row
    offsets: torch.Tensor  # (E_local,) int32: group e is rows offsets[e-1] .. offsets[e] - 1
    held: torch.Tensor  # (T, k) bool: the slot's expert is held here

    @property
    def tokens(self) -> torch.Tensor:
        return self.order // self.held.shape[1]  # (R,) the token each sorted row belongs to


def sort_by_expert(local_experts: torch.Tensor, num_local: int) -> ExpertRows:
    """local_experts (T, k): expert ids minus this rank's first; outside [0, num_local) = elsewhere."""
    held = (local_experts >= 0) & (local_experts < num_local)  # (T, k)
    group = torch.where(held, local_experts, num_local).flatten()  # (R,) remote rows form a last group
    sorted_group, order = torch.sort(group, stable=True)
    bounds = torch.arange(1, num_local + 1, device=group.device, dtype=sorted_group.dtype)
    offsets = torch.searchsorted(sorted_group, bounds).to(torch.int32)  # rows with group < e + 1
    return ExpertRows(order, offsets, held)


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows (R, in) sorted by group, weight (G, out, in), offsets (G,) -> (R, out): group g's rows
    times weight[g]^T; rows past offsets[-1] are left undefined."""
    if _grouped_mm_runs(rows, weight):
        return torch._grouped_mm(rows, weight.transpose(1, 2), offs=offsets)
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    begin = 0
    for group, end in enumerate(offsets.tolist()):  # host sync: the fallback only
        out[begin:end] = rows[begin:end] @ weight[group].T
        begin = end
    return out


def _grouped_mm_runs(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm's fast CUDA kernel is bf16 on compute capability >= 9.0, the CPU has a
    fallback; both want rows of both operands 16-byte aligned."""
    aligned = all(size * rows.element_size() % 16 == 0 for size in weight.shape[1:])
    if not hasattr(torch, "_grouped_mm") or not aligned:
        return False
    if rows.device.type == "cpu":
        return True
    return (rows.device.type == "cuda" and rows.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(rows.device)[0] >= 9)


def combine(outputs: torch.Tensor, rows: ExpertRows, weights: torch.Tensor, all_held: bool) -> torch.Tensor:
    """outputs (R, hidden) in sorted order, routing weights (T, k) -> sum over held slots of
    weight * output, (T, hidden) in the outputs' dtype. `all_held`: this rank holds every expert."""
    tokens, slots = rows.held.shape
    unsorted = torch.empty_like(outputs)
    unsorted[rows.order] = outputs
    weighted = unsorted.view(tokens, slots, -1) * weights.unsqueeze(-1).to(outputs.dtype)  # (T, k, hidden)
    if not all_held:
        weighted = torch.where(rows.held.unsqueeze(-1), weighted, 0)  # remote rows are undefined, maybe NaN
    return weighted.sum(dim=1, dtype=torch.float32).to(outputs.dtype)
