"""Routed experts kept quantized: grouped_experts.grouped_linear without a bf16 copy of the experts.

    rows      (R, K) sorted by expert (grouped_experts.sort_by_expert), offsets (E,) group ends
    slots     tiles of BM rows, each within one expert's group: a group of c rows takes
              ceil(c / BM) slots, so S = ceil(R / BM) + E slots always suffice; built on the
              device (no host sync: the bound is static, unused slots name expert E and idle)
    kernel    program (slot, j) multiplies its rows by columns j*BN .. of its expert's weight,
              each tile dequantized in registers (quantized_linear.py: the reference's rounding)

Rows past offsets[-1] (experts another rank holds) are left undefined, as grouped_linear leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.deepseek_v4.grouped_experts import grouped_linear
from model_shards.deepseek_v4.quantized_linear import (HALF_DTYPES, Fp4RowWeight, Fp8BlockWeight, QuantizedWeight,
                                                       Tiling, kernel_view)


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """E experts of one format: weight (E, N, K) fp8 or (E, N, K/2) e2m1 pairs, scale (E, ...)
    as that format's scale grid; `layout` is Fp8BlockWeight or Fp4RowWeight."""

    weight: torch.Tensor
    scale: torch.Tensor
    layout: type[QuantizedWeight]

    def __post_init__(self) -> None:
        if self.weight.dim() != 3 or self.scale.dim() != 3 or self.weight.shape[0] != self.scale.shape[0]:
            raise ValueError(f"QuantizedExperts: weight {tuple(self.weight.shape)} and scale "
                             f"{tuple(self.scale.shape)} must be (experts, ...) stacks of one length")
        if self.layout not in (Fp8BlockWeight, Fp4RowWeight):
            raise ValueError(f"QuantizedExperts: layout must be Fp8BlockWeight or Fp4RowWeight, got {self.layout}")
        self.expert(0)  # checks one expert's shapes and dtypes (all share them)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert(self, index: int) -> QuantizedWeight:
        return self.layout(self.weight[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """(E, N, K): every expert by the reference's rounding."""
        return torch.stack([self.expert(index).dequantize(dtype) for index in range(self.num_experts)])

    def grouped_linear(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """rows (R, K) sorted by expert, offsets (E,) -> (R, N): the kernel for half rows on CUDA,
        else grouped_linear over the dequantized experts (the reference)."""
        if rows.is_cuda and rows.dtype in HALF_DTYPES:
            return grouped_quantized_matmul(rows, self, offsets)
        return grouped_linear(rows, self.dequantize(rows.dtype), offsets)


def expert_tile_slots(offsets: torch.Tensor, total_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_expert, slot_row) (S,) int32, S = ceil(total_rows / block_m) + E: each slot's expert
    (E past the last tile) and first row; all on the device."""
    ends = offsets.long()
    starts = F.pad(ends[:-1], (1, 0))
    tiles = (ends - starts + block_m - 1) // block_m  # (E,) tiles of each group
    tile_ends = tiles.cumsum(0)
    slot = torch.arange(-(-total_rows // block_m) + len(offsets), device=offsets.device)
    expert = torch.searchsorted(tile_ends, slot, right=True)  # (S,) in [0, E]
    held = expert.clamp(max=len(offsets) - 1)
    first_row = starts[held] + (slot - (tile_ends[held] - tiles[held])) * block_m
    return expert.to(torch.int32), first_row.to(torch.int32)


def default_grouped_tiling(total_rows: int, experts: int) -> Tiling:
    """Row tiles sized to the average group (decode: a few rows per expert; prefill: hundreds)."""
    average = total_rows / max(1, experts)
    block_m = 16 if average <= 16 else 32 if average <= 32 else 64 if average <= 64 else 128
    if block_m == 128:
        return Tiling(block_m=128, block_n=128, block_k=64, warps=8, stages=4)
    return Tiling(block_m=block_m, block_n=64, block_k=128, warps=4, stages=4)


def grouped_quantized_matmul(rows: torch.Tensor, experts: QuantizedExperts, offsets: torch.Tensor,
                             tiling: Tiling | None = None) -> torch.Tensor:
    """rows (R, K) half sorted by expert, offsets (E,) int32 -> (R, N) in rows' dtype."""
    from model_shards.deepseek_v4.quantized_matmul_kernel import launch_grouped_quantized_matmul

    first = experts.expert(0)
    if rows.dim() != 2 or rows.shape[1] != first.in_features or rows.dtype not in HALF_DTYPES \
            or offsets.shape != (experts.num_experts,):
        raise ValueError(f"grouped_quantized_matmul: rows {tuple(rows.shape)} {rows.dtype} and offsets "
                         f"{tuple(offsets.shape)} do not fit {experts.num_experts} experts of {first.in_features} "
                         "inputs (half rows expected)")
    tiling = tiling or default_grouped_tiling(rows.shape[0], experts.num_experts)
    tiling.check()
    if tiling.split_k != 1:
        raise ValueError("grouped_quantized_matmul: split_k must be 1")
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    offsets = offsets.to(torch.int32)
    out = rows.new_empty(rows.shape[0], first.out_features)
    if rows.shape[0] and first.out_features:
        weight, scale = kernel_view(experts.weight, experts.scale)
        launch_grouped_quantized_matmul(rows, weight, scale, first.FORMAT, first.scale_ue8m0, first.in_features,
                                        expert_tile_slots(offsets, rows.shape[0], tiling.block_m), offsets, out,
                                        tiling)
    return out

