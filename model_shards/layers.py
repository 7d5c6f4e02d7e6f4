"""The building blocks of a Llama-family decoder, numerically as transformers' modeling_llama.

Projections are fused (q|k|v in one matrix, gate|up in one) so a step runs one GEMM where HF runs
two or three; loading fills the fused matrix from the separate checkpoint tensors. Sizes come from
per-rank head counts (`TensorParallel`) so that sharding heads later changes no shapes here;
only rank 0 of 1 runs today.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_shards.attention.base import AttentionBackend, AttentionMetadata
from model_shards.hf_config import ModelArchitecture
from model_shards.rope import apply_rotary
from model_shards.weights import WeightReader


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1

    def split(self, total: int, what: str) -> int:
        if total % self.world_size:
            raise ValueError(f"{what}={total} is not divisible by tensor parallel size "
                             f"{self.world_size}")
        return total // self.world_size


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32, cast back, THEN scale in the model dtype: HF's order, which
        # matters for bf16/fp16 results
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)  # (T, 1)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)

    def load(self, reader: WeightReader, prefix: str) -> None:
        reader.copy_into(self.weight.data, prefix + "weight")


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one column-parallel matrix."""

    def __init__(self, arch: ModelArchitecture, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.intermediate = tp.split(arch.intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * self.intermediate, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # (T, inter) each
        return self.down_proj(F.silu(gate) * up)  # (T, hidden)

    def load(self, reader: WeightReader, prefix: str) -> None:
        parts = [(prefix + "gate_proj", self.intermediate), (prefix + "up_proj", self.intermediate)]
        load_column_parallel(reader, self.gate_up_proj, parts, self.tp)
        load_row_parallel(reader, self.down_proj, prefix + "down_proj", self.tp)


class Attention(nn.Module):
    """q/k/v projections, RoPE, paged attention through a backend, output projection."""

    def __init__(self, arch: ModelArchitecture, tp: TensorParallel, backend: AttentionBackend):
        super().__init__()
        self.tp = tp
        self.backend = backend
        self.head_dim = arch.head_dim
        self.num_heads = tp.split(arch.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = tp.split(arch.num_key_value_heads, "num_key_value_heads")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=arch.o_proj_bias)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # (T, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(tokens, self.num_heads, self.head_dim), cos, sin)  # (T, H, D)
        k = apply_rotary(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)  # (T, KV, D)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)  # (T, KV, D)
        out = self.backend.forward(q, k, v, layer_cache, metadata, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(tokens, self.q_size))  # (T, hidden)

    def load(self, reader: WeightReader, prefix: str) -> None:
        parts = [(prefix + "q_proj", self.q_size), (prefix + "k_proj", self.kv_size),
                 (prefix + "v_proj", self.kv_size)]
        load_column_parallel(reader, self.qkv_proj, parts, self.tp)
        load_row_parallel(reader, self.o_proj, prefix + "o_proj", self.tp)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, arch: ModelArchitecture, tp: TensorParallel, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, tp, backend)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = SwiGLUMLP(arch, tp)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), cos, sin, layer_cache, metadata)
        hidden = hidden + attended  # (T, hidden)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def load(self, reader: WeightReader, prefix: str) -> None:
        self.input_layernorm.load(reader, prefix + "input_layernorm.")
        self.self_attn.load(reader, prefix + "self_attn.")
        self.post_attention_layernorm.load(reader, prefix + "post_attention_layernorm.")
        self.mlp.load(reader, prefix + "mlp.")


def load_column_parallel(reader: WeightReader, linear: nn.Linear,
                         parts: list[tuple[str, int]], tp: TensorParallel) -> None:
    """Fill a fused output-sharded linear: each checkpoint part (name prefix, per-rank rows)
    contributes this rank's rows, stacked in order."""
    offset = 0
    for name, rows in parts:
        reader.copy_into(linear.weight.data.narrow(0, offset, rows), name + ".weight",
                         shard_dim=0, rank=tp.rank, world_size=tp.world_size)
        if linear.bias is not None:
            reader.copy_into(linear.bias.data.narrow(0, offset, rows), name + ".bias",
                             shard_dim=0, rank=tp.rank, world_size=tp.world_size)
        offset += rows


def load_row_parallel(reader: WeightReader, linear: nn.Linear, name: str,
                      tp: TensorParallel) -> None:
    """An input-sharded linear: this rank's columns; the bias is added once, by rank 0's copy
    (a later all-reduce sums the ranks' partial outputs)."""
    reader.copy_into(linear.weight.data, name + ".weight", shard_dim=1, rank=tp.rank,
                     world_size=tp.world_size)
    if linear.bias is not None:
        if tp.rank == 0:
            reader.copy_into(linear.bias.data, name + ".bias")
        else:
            reader.get(name + ".bias")  # marks it read; only rank 0 adds the bias
            linear.bias.data.zero_()
