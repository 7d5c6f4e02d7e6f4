"""DeepSeek-V4 projections whose weights may stay as the checkpoint stores them
(model.quantized_weights: keep; docs/quantized_weights.md).

A weight with block scales in the checkpoint is then held as a `QuantizedWeight` (FP8 128 x 128
blocks, quantized_linear.py) or, for the routed experts, as `QuantizedExperts` stacks (one grouped
launch each); a weight stored in bf16 / float32 stays a parameter. On a GPU with half activations
the Triton kernels multiply by the stored bytes; elsewhere the weight is dequantized per call with
the loader's own rounding and the same torch op runs on it, so a CPU model gives the dequantizing
loader's logits bit for bit.

Memory: in keep mode the model calls `defer` before allocating its parameters, so these modules
allocate theirs only at load, in the format the checkpoint has: a kept weight never exists in bf16
on the device (V4-Flash: ~156 GB instead of ~569 GB).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.block_format import BlockScaledPart, part_of_grid
from model_shards.deepseek_v4.grouped_experts import grouped_linear
from model_shards.deepseek_v4.quantized_experts import QuantizedExperts
from model_shards.deepseek_v4.quantized_linear import HALF_DTYPES, QuantizedWeight, from_block_scaled_part, linear
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.parallel.groups import ParallelGroup


class DeferredParameters(nn.Module):
    """Parameters that keep mode allocates at load (`defer`), in the checkpoint's format."""

    def defer(self, device: torch.device) -> None:
        """Drop the (meta) parameters; `allocate` makes them at load, on `device`."""
        self.device = torch.device(device)
        self.deferred = {name: (tuple(parameter.shape), parameter.dtype)
                         for name, parameter in self.named_parameters(recurse=False)}
        for name in self.deferred:
            self.register_parameter(name, None)

    def allocated(self, name: str) -> torch.Tensor:
        """Parameter `name`, allocated now if it was deferred: the destination of a copy_into."""
        if getattr(self, name) is None:
            shape, dtype = self.deferred[name]
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=self.device),
                                                       requires_grad=False))
        return getattr(self, name).data

    def load_device(self) -> torch.device:
        """Where this module's weights go: its parameters' device, or the deferred one."""
        parameter = next(self.parameters(recurse=False), None)
        return parameter.device if parameter is not None else self.device

    def kept_on_device(self, part: BlockScaledPart) -> BlockScaledPart:
        return part.to(self.load_device())

    def kept_nbytes(self) -> int:
        """Bytes of the weights held quantized here (the parameters count themselves)."""
        return 0


class Projection(DeferredParameters):
    """y = x W^T, W (out, in) a parameter or kept quantized; `tp_sum`: a row-parallel projection
    (this rank's input columns), partial sums all-reduced over that group."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, tp_sum: ParallelGroup | None = None):
        super().__init__()
        self.in_features, self.out_features, self.tp_sum = in_features, out_features, tp_sum
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.quantized: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight if self.quantized is None else self.quantized)
        if self.tp_sum is not None and self.tp_sum.size > 1:
            self.tp_sum.all_reduce(out)
        return out

    def load(self, reader: CheckpointTensors, name: str, **shard) -> None:
        """Weight `name` (this rank's rows, shard_dim=0, or columns, shard_dim=1)."""
        part = reader.kept_part(name, **shard)
        if part is None:
            reader.copy_into(self.allocated("weight"), name, **shard)
            return
        self.quantized = from_block_scaled_part(self.kept_on_device(part))
        self.register_parameter("weight", None)  # no bf16 copy (dequantize mode had allocated one)

    def kept_nbytes(self) -> int:
        return 0 if self.quantized is None else self.quantized.nbytes


class GroupedProjection(DeferredParameters):
    """Block-diagonal projection: group g of the input (its heads) -> rows g*R .. (g+1)*R - 1.
    Kept quantized, each group's rows are a weight of their own (R a multiple of the block, or
    groups inside one block): one kernel launch a group on a GPU."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int, dtype: torch.dtype):
        super().__init__()
        self.groups, self.out_per_group = groups, out_per_group
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group, dtype=dtype))
        self.quantized: QuantizedWeight | None = None
        self.quantized_groups: list[QuantizedWeight] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, groups, in_per_group) -> (T, groups, out_per_group)."""
        if self.quantized is not None and x.is_cuda and x.dtype in HALF_DTYPES:
            return torch.stack([group.linear(x[:, index]) for index, group in enumerate(self.quantized_groups)], 1)
        weight = self.weight if self.quantized is None else self.quantized.dequantize(x.dtype)
        weight = weight.view(self.groups, -1, weight.shape[-1]).transpose(1, 2)  # (G, in, out)
        return torch.bmm(x.transpose(0, 1), weight).transpose(0, 1)

    def load(self, reader: CheckpointTensors, name: str, **shard) -> None:
        part = reader.kept_part(name, **shard)
        if part is None:
            reader.copy_into(self.allocated("weight"), name, **shard)
            return
        own = dataclasses.replace(self.kept_on_device(part), first_row=0, first_col=0)  # read_kept checked it
        self.quantized = from_block_scaled_part(own)
        rows = self.out_per_group
        try:
            self.quantized_groups = [from_block_scaled_part(part_of_grid(
                own.values[index * rows:(index + 1) * rows], own.scales, own.block, first_row=index * rows))
                for index in range(self.groups)]
        except ValueError as error:
            raise ModelFolderError(f"{reader.folder}: tensor {name!r}: groups of {rows} rows {error}") from None
        self.register_parameter("weight", None)

    def kept_nbytes(self) -> int:
        return 0 if self.quantized is None else self.quantized.nbytes


@dataclasses.dataclass(frozen=True, eq=False)
class KeptExperts:
    """Experts' stacked matrices (E, N, K) as QuantizedExperts, split along N where the format's
    blocks do not let them concatenate (FP8 gate|up with I not a multiple of 128)."""

    parts: list[QuantizedExperts]

    def grouped_linear(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """rows (R, K) sorted by expert -> (R, N): one grouped kernel launch a part on a GPU, else
        grouped_linear over the dequantized experts (the loader's values, the same op)."""
        if rows.is_cuda and rows.dtype in HALF_DTYPES:
            outputs = [part.grouped_linear(rows, offsets) for part in self.parts]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return grouped_linear(rows, self.dequantize(rows.dtype), offsets)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([part.dequantize(dtype) for part in self.parts], dim=1)  # (E, N, K)

    @property
    def nbytes(self) -> int:
        return sum(part.weight.nbytes + part.scale.nbytes for part in self.parts)


def stack_experts(matrices: list[list[BlockScaledPart]], device: torch.device) -> KeptExperts:
    """matrices[m][e]: expert e's part of matrix m (gate and up, or down alone), to stack along N
    (concatenated in m order). FP4 scales are per row and FP8 ones per 128 rows: matrices join in
    one QuantizedExperts where each one's rows fill whole blocks, else each stays its own."""
    first = matrices[0][0]
    layout = type(from_block_scaled_part(first))
    if first.fp4 or all(part.shape[0] % first.block[0] == 0 for part in matrices[0]):
        groups = [matrices]
    else:
        groups = [[matrix] for matrix in matrices]
    return KeptExperts([_stacked(group, layout, device) for group in groups])


def _stacked(matrices: list[list[BlockScaledPart]], layout: type[QuantizedWeight],
             device: torch.device) -> QuantizedExperts:
    """(E, sum N, K') values and (E, ...) scales of the experts' matrices, joined along N."""
    values = torch.stack([torch.cat([matrix[index].values for matrix in matrices]) for index in range(len(matrices[0]))])
    scales = torch.stack([torch.cat([matrix[index].scales for matrix in matrices]) for index in range(len(matrices[0]))])
    return QuantizedExperts(values.to(device), scales.to(device), layout)


def deferred_linear_bytes(module: nn.Module) -> int:
    """Bytes of every weight `module` and its children hold quantized."""
    return sum(child.kept_nbytes() for child in module.modules() if isinstance(child, DeferredParameters))

