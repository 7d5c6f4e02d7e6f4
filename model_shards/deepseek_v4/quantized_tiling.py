"""The shapes the quantized matmul kernels tile by (quantized_matmul_kernel.py), apart from the
weight formats (quantized_linear.py) so that the kernel and the formats both read them."""

from __future__ import annotations

from dataclasses import dataclass

FP8_BLOCK = 128  # rows and columns of one FP8 scale block
FP4_GROUP = 32  # input columns of one FP4 scale
FP8, FP4 = 0, 1  # the kernel's FORMAT


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tiling:
    """One program's tile and launch shape; `split_k` slices the input columns across programs."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    split_k: int = 1
    weight_left: bool = False  # dot(W tile, x^T): the dequantized tile as the register operand (wgmma's A)

    def check(self) -> None:
        if FP8_BLOCK % self.block_k or self.block_k % FP4_GROUP or min(self.block_m, self.block_n) < 16:
            raise ValueError(f"tiling {self}: block_k must divide {FP8_BLOCK} and be a multiple of {FP4_GROUP}, "
                             "block_m and block_n at least 16 (the smallest tensor-core tile)")


def split_k_plan(in_features: int, tiling: Tiling) -> tuple[int, int]:
    """(input columns per split, a multiple of block_k; number of splits, at most tiling.split_k)."""
    per_split = ceil_div(ceil_div(in_features, tiling.split_k), tiling.block_k) * tiling.block_k
    return per_split, max(1, ceil_div(in_features, per_split))
