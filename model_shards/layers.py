"""The building blocks of a Llama-family decoder, numerically as transformers' modeling_llama.

Projections are fused (q|k|v in one matrix, gate|up in one) so a step runs one GEMM where HF runs
two or three; loading fills the fused matrix from the separate checkpoint tensors. Sizes come from
per-rank head counts of the tensor-parallel group (`model_shards/parallel/tensor_parallel.py`):
q|k|v and gate|up are column-parallel, o_proj and down_proj row-parallel (one all-reduce each).
"""

from __future__ import annotations

import torch
from torch import nn

from model_folder.hf_config import ModelArchitecture
from model_shards.attention.base import AttentionBackend, AttentionMetadata
from model_shards.layer_kernels import add_rms_norm, rotate_queries_and_keys, silu_and_mul
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.tensor_parallel import (
    FusedPart,
    RowParallelLinear,
    load_column_parallel,
)
from model_shards.weights import WeightReader

# A million-token step would hold a (T, 2 * intermediate) activation of ~57 GB for an 8B model;
# the MLP is token-wise, so running it in slices of this many tokens bounds that to ~1.8 GB.
MLP_CHUNK_TOKENS = 32768


class RMSNorm(nn.Module):
    """HF's Llama RMS norm (layer_kernels.rms_norm_torch); `fused`: one kernel on a GPU."""

    def __init__(self, size: int, eps: float, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(x, None)[1]

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, its norm), each (T, hidden): a residual add and the norm after it."""
        return add_rms_norm(residual, delta, self.weight, self.eps, self.fused)

    def load(self, reader: WeightReader, prefix: str) -> None:
        reader.copy_into(self.weight.data, prefix + "weight")


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one column-parallel matrix."""

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup, fused: bool = False):
        super().__init__()
        self.tp = tp
        self.fused = fused
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
        gated = silu_and_mul(self.gate_up_proj(x), self.fused)  # (T, inter), from (T, 2 * inter)
        return self.down_proj(gated)  # (T, hidden)

    def load(self, reader: WeightReader, prefix: str) -> None:
        shard = (self.tp.rank, self.tp.size)
        load_column_parallel(reader, self.gate_up_proj, [FusedPart(prefix + "gate_proj", self.intermediate, shard),
                                                         FusedPart(prefix + "up_proj", self.intermediate, shard)])
        self.down_proj.load(reader, prefix + "down_proj")


class Attention(nn.Module):
    """q/k/v projections, RoPE, paged attention through a backend, output projection."""

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup, backend: AttentionBackend, fused: bool = False):
        super().__init__()
        self.tp = tp
        self.backend = backend
        self.fused = fused
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
        q, k = rotate_queries_and_keys(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim,
                                       self.fused)  # (T, H, D), (T, KV, D)
        v = qkv[:, self.q_size + self.kv_size:].view(tokens, self.num_kv_heads, self.head_dim)  # (T, KV, D)
        out = self.backend.forward(q, k, v, layer_cache, metadata, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(tokens, self.q_size))  # (T, hidden)

    def load(self, reader: WeightReader, prefix: str) -> None:
        q_shard = (self.tp.rank, self.tp.size)
        load_column_parallel(reader, self.qkv_proj, [FusedPart(prefix + "q_proj", self.q_size, q_shard),
                                                     FusedPart(prefix + "k_proj", self.kv_size, self.kv_shard),
                                                     FusedPart(prefix + "v_proj", self.kv_size, self.kv_shard)])
        self.o_proj.load(reader, prefix + "o_proj")


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    The layer takes the residual stream as `residual + delta` and returns its own the same way, the
    MLP's output not yet added: that add runs inside the next norm (one fused kernel on a GPU,
    model_shards/layer_kernels.py). HF adds first, then normalizes: the same ops, the same roundings.
    """

    def __init__(self, arch: ModelArchitecture, tp: ParallelGroup, backend: AttentionBackend, fused: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, fused)
        self.self_attn = Attention(arch, tp, backend, fused)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, fused)
        self.mlp = SwiGLUMLP(arch, tp, fused)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, delta) (T, hidden) each, delta None before the first layer -> the same after."""
        residual, normed = self.input_layernorm.add_and_norm(residual, delta)
        attended = self.self_attn(normed, cos, sin, layer_cache, metadata)
        residual, normed = self.post_attention_layernorm.add_and_norm(residual, attended)
        return residual, self.mlp(normed)

    @torch.inference_mode()
    def warm_up_fused_kernels(self) -> None:
        """Compile the fused kernels now, not in a request: one token through each (token counts
        never compile them again, layer_kernels_triton.py). Without them (off, a CPU): nothing."""
        weight = self.input_layernorm.weight
        if not self.input_layernorm.fused or not weight.is_cuda:
            return
        hidden = torch.zeros(1, weight.shape[0], dtype=weight.dtype, device=weight.device)  # (1, hidden)
        residual, normed = self.input_layernorm.add_and_norm(hidden, None)
        self.post_attention_layernorm.add_and_norm(residual, normed)
        attention = self.self_attn
        qkv = torch.zeros(1, attention.q_size + 2 * attention.kv_size, dtype=weight.dtype, device=weight.device)
        half = torch.zeros(1, attention.head_dim // 2, dtype=weight.dtype, device=weight.device)
        rotate_queries_and_keys(qkv, half, half, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                                attention.fused)
        silu_and_mul(torch.zeros(1, 2 * self.mlp.intermediate, dtype=weight.dtype, device=weight.device),
                     self.mlp.fused)

    def load(self, reader: WeightReader, prefix: str) -> None:
        self.input_layernorm.load(reader, prefix + "input_layernorm.")
        self.self_attn.load(reader, prefix + "self_attn.")
        self.post_attention_layernorm.load(reader, prefix + "post_attention_layernorm.")
        self.mlp.load(reader, prefix + "mlp.")

