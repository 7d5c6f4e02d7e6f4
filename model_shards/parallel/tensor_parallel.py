"""Tensor-parallel building blocks (Megatron-style) and how each rank loads only its slice.

- Column-parallel (q|k|v, gate|up): output rows split across ranks, no communication; a fused
  matrix stacks this rank's rows of each checkpoint tensor.
- Row-parallel (o_proj, down_proj): input columns split; partial products are summed with one
  all-reduce, then the bias is added once (after the sum, on every rank).
- Vocab-parallel embedding and LM head: vocabulary rows split (padded up to a multiple of tp);
  a lookup zeroes the rows other ranks own and all-reduces; logits are all-gathered along the
  vocabulary and the padding columns dropped.
Each rank reads only its part of every tensor from the safetensors files (`WeightReader` slices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_folder.errors import ModelFolderError
from model_shards.parallel.groups import ParallelGroup
from model_shards.weights import WeightReader


@dataclass(frozen=True)
class FusedPart:
    """One checkpoint tensor's share of a fused column-parallel matrix."""

    name: str  # checkpoint name without ".weight" / ".bias"
    rows: int  # rows this rank holds
    shard: tuple[int, int]  # (shard index, shard count) along the output dimension


def load_column_parallel(reader: WeightReader, linear: nn.Linear, parts: list[FusedPart]) -> None:
    """Fill a fused output-sharded linear with this rank's rows of each part, stacked in order."""
    offset = 0
    for part in parts:
        index, count = part.shard
        reader.copy_into(linear.weight.data.narrow(0, offset, part.rows), part.name + ".weight",
                         shard_dim=0, rank=index, world_size=count)
        if linear.bias is not None:
            reader.copy_into(linear.bias.data.narrow(0, offset, part.rows), part.name + ".bias",
                             shard_dim=0, rank=index, world_size=count)
        offset += part.rows


class RowParallelLinear(nn.Linear):
    """An input-sharded linear: this rank's columns, partial sums all-reduced over TP."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: ParallelGroup):
        super().__init__(in_features, out_features, bias=bias)  # in_features: this rank's share
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)  # one fused GEMM + bias, as transformers
        partial = F.linear(x, self.weight)  # (T, out) summed over this rank's inputs only
        self.tp.all_reduce(partial)
        return partial if self.bias is None else partial + self.bias

    def load(self, reader: WeightReader, name: str) -> None:
        reader.copy_into(self.weight.data, name + ".weight", shard_dim=1, rank=self.tp.rank,
                         world_size=self.tp.size)
        if self.bias is not None:
            reader.copy_into(self.bias.data, name + ".bias")


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V' / tp, (rank + 1) * V' / tp) of a (V', hidden) matrix: the token embedding,
    or the LM head (a tied model uses one instance for both).

    V' is the vocabulary V padded up to a multiple of tp (vLLM does the same), so that any
    vocabulary splits: 415 tokens over 2 ranks is 208 rows each, the last one zero padding. No
    token id reaches a padding row, and `logits` drops the padding columns before anyone samples.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.num_local = -(-vocab_size // tp.size)  # rows per rank, padding included
        self.start = tp.rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden_size))

    @property
    def padded_vocab_size(self) -> int:
        return self.num_local * self.tp.size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden)."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_local)  # (T,) rows other ranks own
        hidden = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)  # (T, hidden)
        hidden.masked_fill_(elsewhere[:, None], 0)
        return self.tp.all_reduce(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32; the matmul runs in the model dtype, as in HF."""
        local = F.linear(hidden, self.weight).float()  # (N, V' / tp)
        logits = self.tp.all_gather(local, dim=-1)  # (N, V'): padding columns last
        if self.padded_vocab_size == self.vocab_size:
            return logits
        return logits[:, :self.vocab_size].contiguous()  # padded logits never reach the sampler

    def load(self, reader: WeightReader, name: str) -> None:
        if self.tp.size == 1:
            reader.copy_into(self.weight.data, name)
            return
        rows = reader.shape(name)[0]
        if rows != self.vocab_size:
            raise ModelFolderError(f"{reader.folder}: tensor {name!r} has {rows} rows but vocab_size is "
                                   f"{self.vocab_size}")
        self.weight.data.zero_()  # padding rows: zero, never looked up, their logits dropped
        reader.copy_rows_into(self.weight.data, name, self.start, self.start + self.num_local)
