"""DeepSeek's block-scaled weights in torch: FP8 (e4m3) and FP4 (e2m1, two per byte) values, each
block of (bm, bn) elements sharing one scale; the value is stored * scale.

Block semantics are DeepSeek's own: a (rows, cols) weight has a scale grid of
(ceil(rows / bm), ceil(cols / bn)), element (i, j) taking scale [i // bm, j // bn]; the last
blocks of a row or column may be partial. (transformers' `Fp8Dequantize` derives the block from
the grid instead, rows // grid_rows: the same wherever each dimension is a multiple of the block
or smaller than it, which the test presets keep to.)

`dequantize` is the reference computation (transformers' `dequantize=True` and DeepSeek's own
`gemm_impl="bf16"`): value * scale in float32, rounded once to the parameter's dtype.
`quantize_fp8` / `quantize_fp4` write the released format (`longctx make-model --quantize fp8`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_folder.deepseek_v4_quantization import FP4_BLOCK

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1
# e2m1 codes 0..15: bit 3 the sign, bits 0-2 index the magnitudes
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
ONE_BYTE_SCALES = (torch.float8_e8m0fnu, torch.uint8)  # ue8m0: 2 ** (byte - 127)


@dataclass(frozen=True)
class BlockScaledPart:
    """Rows [first_row, first_row + R) x columns [first_col, first_col + C) of a block-scaled
    weight as stored, with the scale blocks that overlap them. What a rank loads; a future
    FP8-GEMM path would keep it on the device as is instead of calling `dequantize`."""

    values: torch.Tensor  # (R, C) float8_e4m3fn, or (R, C / 2) uint8: two e2m1 codes a byte, low nibble first
    scales: torch.Tensor  # (blocks over the rows, blocks over the columns): float32, or ue8m0 bytes
    block: tuple[int, int]  # (bm, bn)
    first_row: int = 0
    first_col: int = 0

    @property
    def fp4(self) -> bool:
        return self.values.dtype == torch.uint8

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return rows, 2 * cols if self.fp4 else cols

    def to(self, device: torch.device | str) -> BlockScaledPart:
        return dataclasses.replace(self, values=self.values.to(device), scales=self.scales.to(device))


def part_of_grid(values: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], first_row: int = 0,
                 first_col: int = 0) -> BlockScaledPart:
    """The part holding `values` at (first_row, first_col) of a weight whose whole scale grid is
    `grid`: it keeps the grid's blocks over its rows and columns only."""
    part = BlockScaledPart(values, grid, block, first_row, first_col)
    (rows, cols), (bm, bn) = part.shape, block
    overlapping = grid[first_row // bm:math.ceil((first_row + rows) / bm),
                       first_col // bn:math.ceil((first_col + cols) / bn)]
    return dataclasses.replace(part, scales=overlapping)


def owns_its_blocks(first: int, size: int, block: int) -> bool:
    """Elements first .. first+size-1 of a dimension, cut into `block`-wide blocks, read exactly as
    a weight of their own (its blocks starting at its first element): the part starts on a block
    boundary or lies inside one block."""
    return first % block == 0 or first % block + size <= block


def dequantize(part: BlockScaledPart, dtype: torch.dtype) -> torch.Tensor:
    """(R, C) stored values * their blocks' scales, computed in float32, on the part's device."""
    values = unpack_fp4(part.values) if part.fp4 else part.values.to(torch.float32)
    return values.mul_(block_scales(part)).to(dtype)


def block_scales(part: BlockScaledPart) -> torch.Tensor:
    """(R, C) float32: each element's scale (a shard may start inside a block)."""
    rows, cols = part.shape
    row_blocks = _block_indices(part.first_row, rows, part.block[0], part.scales.device)
    col_blocks = _block_indices(part.first_col, cols, part.block[1], part.scales.device)
    return scale_values(part.scales).index_select(0, row_blocks).index_select(1, col_blocks)


def _block_indices(first: int, count: int, block: int, device: torch.device) -> torch.Tensor:
    """Index into the part's scale rows (or columns) of each of its elements."""
    return torch.arange(first, first + count, device=device) // block - first // block


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """float32 scales from float32 or ue8m0 (float8_e8m0fnu, or its raw bytes as uint8)."""
    return ue8m0_to_float(scales) if scales.dtype in ONE_BYTE_SCALES else scales.to(torch.float32)


def ue8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 bytes (uint8 or float8_e8m0fnu) -> float32 2 ** (byte - 127); 255 is NaN (e8m0fnu)."""
    bits = scale.view(torch.uint8).to(torch.int32) << 23
    bits = torch.where(scale.view(torch.uint8) == 0, 0x00400000, bits)  # 2 ** -127, a subnormal
    return torch.where(scale.view(torch.uint8) == 255, 0x7FC00000, bits).view(torch.float32)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(R, C / 2) bytes of two e2m1 codes (low nibble = even column) -> (R, C) float32."""
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # (R, C)
    return table[codes.long()]


# --- quantization (the writer's side) -------------------------------------------------------------


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) float -> (float8_e4m3fn values (R, C), scales): scale = block amax / 448; ue8m0
    rounds it up to a power of two (so nothing clips) and stores it as float8_e8m0fnu, else float32."""
    scales = _amax_scales(weight, block, FP8_MAX, ue8m0)
    values = (weight.to(torch.float32) / _expanded(scales, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return values.to(torch.float8_e4m3fn), scales.to(torch.float8_e8m0fnu) if ue8m0 else scales


def quantize_fp4(weight: torch.Tensor, group: int = FP4_BLOCK[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) float, C even -> (int8 (R, C / 2): two e2m1 codes a byte, low nibble first; ue8m0
    scales (R, ceil(C / group))): scale = amax of `group` columns / 6, rounded up to a power of two,
    each value rounded to the nearest e2m1 magnitude."""
    if weight.shape[-1] % 2:
        raise ValueError(f"an FP4 weight needs an even number of columns, got shape {tuple(weight.shape)}")
    scales = _amax_scales(weight, (1, group), FP4_MAX, ue8m0=True)
    scaled = weight.to(torch.float32) / _expanded(scales, weight.shape, (1, group))
    magnitudes = torch.tensor(E2M1_VALUES[:8], device=weight.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2  # a tie rounds to the smaller magnitude
    codes = torch.bucketize(scaled.abs(), midpoints) | (scaled < 0).long() << 3  # (R, C)
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)
    return packed.view(torch.int8), scales.to(torch.float8_e8m0fnu)


def _amax_scales(weight: torch.Tensor, block: tuple[int, int], largest: float, ue8m0: bool) -> torch.Tensor:
    """(ceil(R / bm), ceil(C / bn)) float32: each block's amax / largest (1 for an all-zero block)."""
    (rows, cols), (bm, bn) = weight.shape, block
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    padded = F.pad(weight.to(torch.float32).abs(), (0, grid[1] * bn - cols, 0, grid[0] * bm - rows))
    amax = padded.view(grid[0], bm, grid[1], bn).amax(dim=(1, 3))
    scales = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
    return torch.exp2(torch.ceil(torch.log2(scales))) if ue8m0 else scales


def _expanded(scales: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
