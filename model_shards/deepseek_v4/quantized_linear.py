"""DeepSeek-V4 linear weights kept quantized on the GPU, multiplied without a bf16 copy.

Formats (as DeepSeek publishes V4; docs/quantized_weights.md):
- `Fp8BlockWeight`: float8_e4m3fn (N, K), one scale per 128 x 128 block, grid (ceil(N/128),
  ceil(K/128)), float32 or ue8m0 (2 ** (byte - 127), torch.float8_e8m0fnu or uint8).
- `Fp4RowWeight`: e2m1 codes two per byte (N, K/2) int8 or uint8, low nibble the even column,
  one ue8m0 scale per row per 32 input columns (N, ceil(K/32)): MXFP4, the MoE experts.

The reference (transformers' `dequantize=True`, DeepSeek's inference `gemm_impl="bf16"`) is
`W = bf16(float32(value) * float32(scale))`, then a plain bf16 linear: `dequantize()` here.
`linear(x)` computes the same y = x @ W^T, on CUDA by the kernels of quantized_matmul_kernel.py
(each weight tile dequantized in registers with that same rounding, a bf16 tensor-core dot, float32
accumulation), elsewhere by dequantize + F.linear. The two differ by float32 summation order only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.deepseek_v4.block_format import (
    BlockScaledPart,
    owns_its_blocks,
    ue8m0_to_float,
    unpack_fp4,
)
from model_shards.deepseek_v4.quantized_tiling import (
    FP4,
    FP4_GROUP,
    FP8,
    FP8_BLOCK,
    Tiling,
    ceil_div,
    split_k_plan,
)

UE8M0_DTYPES = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
HALF_DTYPES = (torch.bfloat16, torch.float16)
DECODE_ROWS = 64  # at most this many rows: memory-bound, small tiles and split-K


def kernel_view(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scale) as the kernels read them: e2m1 pairs and ue8m0 scales as uint8."""
    weight = weight.view(torch.uint8) if weight.dtype == torch.int8 else weight
    return weight, scale.view(torch.uint8) if scale.dtype in UE8M0_DTYPES else scale


def _scale_as_float(scale: torch.Tensor) -> torch.Tensor:
    return ue8m0_to_float(scale) if scale.dtype in UE8M0_DTYPES else scale.float()


class QuantizedWeight:
    """What both formats share: dequantize (the reference) and linear (the kernel on CUDA)."""

    weight: torch.Tensor
    scale: torch.Tensor
    FORMAT: int

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def scale_ue8m0(self) -> bool:
        return self.scale.dtype in UE8M0_DTYPES

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """(N, K) dtype(float32(value) * float32(scale)): the reference's rounding."""
        return (self.values_float() * self.scales_per_element()).to(dtype)

    def values_float(self) -> torch.Tensor:
        raise NotImplementedError

    def scales_per_element(self) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype: the kernel for half x on CUDA, else the reference."""
        if x.is_cuda and x.dtype in HALF_DTYPES:
            return quantized_matmul(x, self)
        return F.linear(x, self.dequantize(x.dtype))

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel_view(self.weight, self.scale)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale.nbytes

    def _check(self, scale_shape: tuple[int, int], weight_dtypes: tuple[torch.dtype, ...],
               scale_dtypes: tuple[torch.dtype, ...]) -> None:
        name = type(self).__name__
        if self.weight.dim() != 2 or self.weight.dtype not in weight_dtypes or self.weight.stride(1) != 1:
            raise ValueError(f"{name}: weight must be 2-D {weight_dtypes} with unit column stride, "
                             f"got {tuple(self.weight.shape)} {self.weight.dtype}")
        if tuple(self.scale.shape) != scale_shape or self.scale.dtype not in scale_dtypes:
            raise ValueError(f"{name}: scale must be {scale_shape} of {scale_dtypes}, "
                             f"got {tuple(self.scale.shape)} {self.scale.dtype}")
        if self.scale.device != self.weight.device or self.scale.stride(-1) != 1:
            raise ValueError(f"{name}: scale must sit on the weight's device with unit column stride")


@dataclass(frozen=True, eq=False)
class Fp8BlockWeight(QuantizedWeight):
    """float8_e4m3fn (N, K) with one scale per 128 x 128 block, (ceil(N/128), ceil(K/128))."""

    weight: torch.Tensor
    scale: torch.Tensor
    FORMAT = FP8

    def __post_init__(self) -> None:
        rows, cols = self.weight.shape if self.weight.dim() == 2 else (0, 0)
        self._check((ceil_div(rows, FP8_BLOCK), ceil_div(cols, FP8_BLOCK)), (torch.float8_e4m3fn,),
                    (torch.float32, *UE8M0_DTYPES))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def values_float(self) -> torch.Tensor:
        return self.weight.float()

    def scales_per_element(self) -> torch.Tensor:
        rows, cols = self.weight.shape
        per_block = _scale_as_float(self.scale)
        return per_block.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]


@dataclass(frozen=True, eq=False)
class Fp4RowWeight(QuantizedWeight):
    """e2m1 pairs (N, K/2) int8/uint8 (low nibble = even column), ue8m0 scales (N, ceil(K/32))."""

    weight: torch.Tensor
    scale: torch.Tensor
    FORMAT = FP4

    def __post_init__(self) -> None:
        rows, byte_cols = self.weight.shape if self.weight.dim() == 2 else (0, 0)
        self._check((rows, ceil_div(2 * byte_cols, FP4_GROUP)), (torch.int8, torch.uint8), UE8M0_DTYPES)

    @property
    def in_features(self) -> int:
        return 2 * self.weight.shape[1]

    def values_float(self) -> torch.Tensor:
        return unpack_fp4(self.weight.view(torch.uint8))  # (N, K) float32, the loader's own decoding

    def scales_per_element(self) -> torch.Tensor:
        return ue8m0_to_float(self.scale).repeat_interleave(FP4_GROUP, 1)[:, :self.in_features]


def from_block_scaled_part(part: BlockScaledPart) -> QuantizedWeight:
    """The loader's part of a checkpoint weight (block_format.py), kept as it is stored. The kernels
    want scale blocks that start at the part's first row and column: a tensor-parallel shard must
    fall on block boundaries (128 for FP8; any row and 32 columns for FP4) or, along a dimension,
    lie inside one block (its one overlapping scale is then its own grid: re-blocked, exactly)."""
    (block_rows, block_cols), fp4 = part.block, part.fp4
    expected = (1, FP4_GROUP) if fp4 else (FP8_BLOCK, FP8_BLOCK)
    rows, cols = part.shape
    if part.block != expected or not (owns_its_blocks(part.first_row, rows, block_rows)
                                      and owns_its_blocks(part.first_col, cols, block_cols)):
        raise ValueError(f"a {'FP4' if fp4 else 'FP8'} part with blocks {part.block} at ({part.first_row}, "
                         f"{part.first_col}) cannot stay quantized: the kernels need {expected} blocks starting "
                         "at the part's first row and column (shard on block boundaries, or dequantize it)")
    return Fp4RowWeight(part.values, part.scales) if fp4 else Fp8BlockWeight(part.values, part.scales)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """F.linear for a plain weight; for a quantized one its kernel (CUDA) or reference: where the
    model calls F.linear(x, W), a loader may hand it either."""
    return weight.linear(x) if isinstance(weight, QuantizedWeight) else F.linear(x, weight)


def default_tiling(rows: int, weight: QuantizedWeight, processors: int) -> Tiling:
    """Small M (decode): 16/32/64-row tiles, K split until ~2 programs per SM read the weight.
    Large M (prefill): 128 x 128 tiles, compute-bound. See bench/quantized_linear.py."""
    if rows > DECODE_ROWS:
        return Tiling(block_m=128, block_n=128, block_k=64, warps=8, stages=4)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    tiles = ceil_div(rows, block_m) * ceil_div(weight.out_features, 64)
    k_tiles = ceil_div(weight.in_features, 128)
    split = max(1, min(k_tiles, 16, ceil_div(2 * processors, tiles)))
    return Tiling(block_m=block_m, block_n=64, block_k=128, warps=4, stages=4, split_k=split)


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, tiling: Tiling | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp16 -> x @ W^T (..., N) in x's dtype, W dequantized tile by tile in the kernel."""
    from model_shards.deepseek_v4.quantized_matmul_kernel import launch_quantized_matmul

    if x.shape[-1] != weight.in_features or x.dtype not in HALF_DTYPES or x.device != weight.weight.device:
        raise ValueError(f"quantized_matmul: x {tuple(x.shape)} {x.dtype} on {x.device} does not fit a weight of "
                         f"{weight.in_features} inputs on {weight.weight.device} (half x expected)")
    rows_2d = x.reshape(-1, weight.in_features)
    rows_2d = rows_2d if rows_2d.stride(-1) == 1 else rows_2d.contiguous()
    rows = rows_2d.shape[0]
    tiling = tiling or default_tiling(rows, weight, _processors(x.device))
    tiling.check()
    _, split = split_k_plan(weight.in_features, tiling)
    out = x.new_empty((split, rows, weight.out_features), dtype=torch.float32 if split > 1 else x.dtype)
    if rows and weight.out_features:
        launch_quantized_matmul(rows_2d, *weight.kernel_operands(), weight.FORMAT, weight.scale_ue8m0,
                                weight.in_features, out, tiling)
    result = out.sum(dim=0).to(x.dtype) if split > 1 else out[0]
    return result.view(*x.shape[:-1], weight.out_features)


def dequantize_triton(weight: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W (N, K) by the matmul kernel's own tile code: equals weight.dequantize(dtype) bit for bit."""
    from model_shards.deepseek_v4.quantized_matmul_kernel import launch_dequantize

    out = torch.empty(weight.out_features, weight.in_features, dtype=dtype, device=weight.weight.device)
    if out.numel():
        launch_dequantize(*weight.kernel_operands(), weight.FORMAT, weight.scale_ue8m0, out)
    return out


def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
