"""The building blocks of a Llama-family decoder, numerically as transformers' modeling_llama.

Projections are fused (q|k|v in one matrix, gate|up in one) so a step runs one GEMM where HF runs
two or three; loading fills the fused matrix from the separate checkpoint tensors. Sizes come from
per-rank head counts of the tensor-parallel group (`model_shards/parallel/tensor_parallel.py`):
q|k|v and gate|up are column-parallel, o_proj and down_proj row-parallel (one all-reduce each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_folder.hf_config import ModelArchitecture
from model_shards.attention.base import AttentionBackend, AttentionMetadata
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.tensor_parallel import (
    FusedPart,
    RowParallelLinear,
    load_column_parallel,
)
from model_shards.rope import apply_rotary
from model_shards.weights import WeightReader

# A million-token step would hold a (T, 2 * intermediate) activation of ~57 GB for an 8B model;
# the MLP is token-wise, so running it in slices of this many tokens bounds that to ~1.8 GB.
MLP_CHUNK_TOKENS = 32768


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

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.intermediate = tp.split(arch.intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * self.intermediate, bias=arch.mlp_bias)
        self.down_proj = RowParallelLinear(self.intermediate, arch.hidden_size, arch.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= MLP_CHUNK_TOKENS:
            return self._forward(x)
        out = torch.empty_like(x)  # (T, hidden)
        for start in range(0, x.shape[0], MLP_CHUNK_TOKENS):
            out[start:start + MLP_CHUNK_TOKENS] = self._forward(x[start:start + MLP_CHUNK_TOKENS])
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # (T, inter) each
        return self.down_proj(F.silu(gate) * up)  # (T, hidden)

    def load(self, reader: WeightReader, prefix: str) -> None:
        shard = (self.tp.rank, self.tp.size)
        load_column_parallel(reader, self.gate_up_proj, [FusedPart(prefix + "gate_proj", self.intermediate, shard),
                                                         FusedPart(prefix + "up_proj", self.intermediate, shard)])
        self.down_proj.load(reader, prefix + "down_proj")


class Attention(nn.Module):
    """q/k/v projections, RoPE, paged attention through a backend, output projection."""

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup, backend: AttentionBackend):
        super().__init__()
        self.tp = tp
        self.backend = backend
        self.head_dim = arch.head_dim
        self.num_heads = tp.split(arch.num_attention_heads, "num_attention_heads")
        # KV heads are split like the query heads, or replicated when there are fewer than ranks
        # (rank r's query heads all map to the one KV head it holds).
        self.kv_shard = tp.head_shard(arch.num_key_value_heads, "num_key_value_heads")
        self.num_kv_heads = arch.num_key_value_heads // self.kv_shard[1]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=arch.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, arch.hidden_size, arch.o_proj_bias, tp)

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
        q_shard = (self.tp.rank, self.tp.size)
        load_column_parallel(reader, self.qkv_proj, [FusedPart(prefix + "q_proj", self.q_size, q_shard),
                                                     FusedPart(prefix + "k_proj", self.kv_size, self.kv_shard),
                                                     FusedPart(prefix + "v_proj", self.kv_size, self.kv_shard)])
        self.o_proj.load(reader, prefix + "o_proj")


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup, backend: AttentionBackend):
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

