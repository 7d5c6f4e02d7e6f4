"""One rank's part of a block-scaled weight, read from a DeepSeek checkpoint and checked.

The loader (`weights.py::CheckpointTensors`) pairs `X.weight` with `X.scale` (or transformers'
`X.weight_scale_inv`), reads the part of the weight this rank holds (its rows or columns under
tensor parallelism; whole experts under expert parallelism) and the scale blocks over that part,
then dequantizes it on the parameter's device (`block_format.dequantize`, one tensor at a time: the
host never holds the model in float32). A shard boundary may fall inside a block: the part keeps
its first row and column, so each element still finds its block's scale. With
model.quantized_weights: keep, `read_kept` hands the part itself to the model (kept_weights.py).
"""

from __future__ import annotations

import math

import torch

from model_folder.deepseek_v4_quantization import FP4, UE8M0, BlockQuantization
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.block_format import (ONE_BYTE_SCALES, BlockScaledPart, dequantize, owns_its_blocks,
                                                   part_of_grid)
from model_shards.weights import WeightReader

FP4_STORAGE = (torch.int8, torch.uint8)  # DeepSeek's layout; safetensors 0.8 cannot read its own F4 back
QUANTIZED_STORAGE = ("F8_E4M3", "F8_E5M2", "I8", "U8", "F4")  # safetensors' names: such a weight needs a scale


class BlockScaledReader:
    """Reads `BlockScaledPart`s of one checkpoint quantized as `quantization` says."""

    def __init__(self, reader: WeightReader, quantization: BlockQuantization):
        self.reader, self.quantization = reader, quantization

    def copy_into(self, destination: torch.Tensor, weight: str, scale: str, *, expert: bool,
                  shard_dim: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        """Dequantize this rank's part of `weight` into destination, on destination's device."""
        part = self.read(weight, scale, expert=expert, shard_dim=shard_dim, rank=rank, world_size=world_size)
        if part.shape != tuple(destination.shape):
            raise ModelFolderError(f"{self.reader.folder}: tensor {weight!r} holds {self._logical_shape(weight)} "
                                   f"values (this rank's part {part.shape}) but the model expects "
                                   f"{tuple(destination.shape)}")
        destination.copy_(dequantize(part.to(destination.device), destination.dtype))

    def read(self, weight: str, scale: str, *, expert: bool, shard_dim: int | None = None, rank: int = 0,
             world_size: int = 1) -> BlockScaledPart:
        full = self._logical_shape(weight)
        values = self.reader.get(weight, shard_dim=shard_dim, rank=rank, world_size=world_size)
        fp4 = self._check_storage(weight, values.dtype, expert)
        block = self.quantization.block_of(fp4)
        first = [0, 0]  # the part's first row and column in the whole weight
        if shard_dim is not None:
            first[shard_dim] = rank * (full[shard_dim] // world_size)
        return part_of_grid(values.view(torch.uint8) if fp4 else values,
                            self._checked_scales(scale, weight, full, block, fp4), block, *first)

    def read_kept(self, weight: str, scale: str, *, expert: bool, shard_dim: int | None = None, rank: int = 0,
                  world_size: int = 1) -> BlockScaledPart:
        """This rank's part, to stay quantized (model.quantized_weights: keep). The kernels read a
        part as a weight of its own, which is exact where it starts on a block boundary or lies
        inside one block (block_format.owns_its_blocks); another cut is refused with the tensor-
        parallel sizes that work for this weight (re-quantizing would change its values)."""
        part = self.read(weight, scale, expert=expert, shard_dim=shard_dim, rank=rank, world_size=world_size)
        if shard_dim is None or _cuts_exactly(part.shape[shard_dim] * world_size, part.block[shard_dim], world_size):
            return part
        size, block = part.shape[shard_dim] * world_size, part.block[shard_dim]
        valid = [ways for ways in range(1, size + 1) if size % ways == 0 and _cuts_exactly(size, block, ways)]
        raise ModelFolderError(f"{self.reader.folder}: tensor {weight!r} split {world_size} ways cuts inside its "
                               f"{block}-wide blocks and cannot stay quantized; tensor-parallel sizes that keep it: "
                               f"{valid} (or set model.quantized_weights: dequantize)")

    def _check_storage(self, weight: str, dtype: torch.dtype, expert: bool) -> bool:
        """True for FP4 storage; the dtype must be what quantization_config says for this weight."""
        fp4 = expert and self.quantization.expert_format == FP4
        if (dtype in FP4_STORAGE) != fp4 or (not fp4 and dtype != torch.float8_e4m3fn):
            wanted = "int8 (FP4 pairs)" if fp4 else "float8_e4m3fn"
            kind = f"a routed expert with expert_dtype {self.quantization.expert_format!r}" if expert else "a linear"
            raise ModelFolderError(f"{self.reader.folder}: tensor {weight!r} is stored as {dtype}, but as {kind} it "
                                   f"must be {wanted}")
        return fp4

    def _logical_shape(self, weight: str) -> tuple[int, int]:
        shape = self.reader.shape(weight)
        if self.reader.stored_dtype(weight) == "F4":
            raise ModelFolderError(f"{self.reader.folder}: tensor {weight!r} is stored as F4, which safetensors "
                                   "does not read back reliably; store FP4 pairs as int8 (DeepSeek's layout)")
        if len(shape) != 2:
            raise ModelFolderError(f"{self.reader.folder}: tensor {weight!r} of shape {shape} has a scale, "
                                   "but only 2-D weights are block-scaled")
        fp4 = self.reader.stored_dtype(weight) in ("I8", "U8")
        return shape[0], shape[1] * 2 if fp4 else shape[1]

    def _checked_scales(self, scale: str, weight: str, full: tuple[int, int], block: tuple[int, int],
                        fp4: bool) -> torch.Tensor:
        scales = self.reader.get(scale)
        grid = tuple(math.ceil(size / edge) for size, edge in zip(full, block))
        if tuple(scales.shape) != grid:
            raise ModelFolderError(f"{self.reader.folder}: tensor {scale!r} has shape {tuple(scales.shape)}, but "
                                   f"{weight!r} ({full[0]} x {full[1]} values in {block[0]} x {block[1]} blocks) "
                                   f"needs a scale grid of {grid}")
        one_byte = fp4 or self.quantization.scale_format == UE8M0
        if (scales.dtype in ONE_BYTE_SCALES) != one_byte or (not one_byte and scales.dtype != torch.float32):
            wanted = "ue8m0 (float8_e8m0fnu or uint8)" if one_byte else "float32 (scale_fmt 'float')"
            raise ModelFolderError(f"{self.reader.folder}: tensor {scale!r} is {scales.dtype}; {weight!r} needs "
                                   f"{wanted} scales")
        return scales


def _cuts_exactly(size: int, block: int, ways: int) -> bool:
    """Every one of `ways` equal parts of a `size`-long dimension reads its blocks exactly."""
    part = size // ways
    return all(owns_its_blocks(rank * part, part, block) for rank in range(ways))
