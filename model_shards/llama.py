"""Llama-family causal LM (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5) over a paged KV cache.

One forward runs a flattened batch of several sequences (prefill chunks and decode tokens mixed),
described by an AttentionMetadata; logits are computed only for the rows the caller picks.
With a tensor-parallel group each rank holds 1/tp of the heads, of the MLP and of the vocabulary
(model_shards/parallel/tensor_parallel.py); sequence parallelism lives in the attention backend
and the worker's batch (model_shards/parallel/sequence_parallel.py), not here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model_folder.errors import ModelFolderError
from model_folder.hf_config import ModelArchitecture, load_architecture
from model_shards.attention import (
    AttentionBackend,
    AttentionMetadata,
    get_attention_backend,
)
from model_shards.kv_cache import KVCacheTensors
from model_shards.layers import DecoderLayer, RMSNorm
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.tensor_parallel import VocabParallelEmbedding
from model_shards.rope import RotaryEmbedding
from model_shards.weights import WeightReader

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Checkpoint tensors that carry no weights of ours: old checkpoints saved RoPE's inv_freq buffer.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_dtype(arch: ModelArchitecture) -> torch.dtype:
    """config.json's torch_dtype, or float32 when it names none (or one we do not run)."""
    return _DTYPES.get(str(arch.torch_dtype).removeprefix("torch."), torch.float32)


class LlamaForCausalLM(nn.Module):
    """Parameters are uninitialized until `load_weights` (or use `from_folder`)."""

    def __init__(self, arch: ModelArchitecture, dtype: torch.dtype, device: torch.device | str,
                 attention_backend: AttentionBackend | str = "torch_sdpa", tp: ParallelGroup | None = None,
                 fused_layer_kernels: bool = True):
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.tp = tp or ParallelGroup.single()
        backend = (get_attention_backend(attention_backend)
                   if isinstance(attention_backend, str) else attention_backend)
        # Build on the meta device, then allocate uninitialized storage once: random
        # initialization of billions of parameters that load_weights overwrites would waste minutes.
        with torch.device("meta"):
            self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, self.tp)
            self.layers = nn.ModuleList(DecoderLayer(arch, self.tp, backend, fused_layer_kernels)
                                        for _ in range(arch.num_hidden_layers))
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, fused_layer_kernels)
            # tied: compute_logits reads the embedding matrix itself (one tensor, no copy)
            self.lm_head = None if arch.tie_word_embeddings else VocabParallelEmbedding(
                arch.vocab_size, arch.hidden_size, self.tp)
        self.to(dtype)  # still on meta: casting costs nothing
        self.to_empty(device=device)
        self.rotary = RotaryEmbedding(arch, dtype, device)
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu",
                    attention_backend: AttentionBackend | str = "torch_sdpa",
                    tp: ParallelGroup | None = None) -> LlamaForCausalLM:
        """Read config.json, build the model on `device` (in the checkpoint's dtype unless
        `dtype` is given), load this rank's part of the safetensors weights."""
        arch = load_architecture(folder)
        model = cls(arch, dtype or checkpoint_dtype(arch), device, attention_backend, tp)
        with WeightReader(folder) as reader:
            model.load_weights(reader)
        return model

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds (split, or one replicated head when tp > KV heads)."""
        return self.layers[0].self_attn.num_kv_heads

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCacheTensors:
        """A cache matching this model's per-rank KV heads, in the model's dtype and device."""
        return KVCacheTensors(num_blocks, self.arch.num_hidden_layers, block_size, self.num_kv_heads,
                              self.arch.head_dim, self.dtype, self.device)

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block of this rank's cache, before allocating it."""
        element_size = torch.empty(0, dtype=self.dtype).element_size()
        return self.arch.num_hidden_layers * 2 * block_size * self.num_kv_heads * self.arch.head_dim * element_size

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata, kv_cache: KVCacheTensors) -> torch.Tensor:
        """input_ids, positions (T,) long -> final-norm hidden states (T, hidden).

        Writes each layer's new K/V into kv_cache at metadata.slot_mapping.
        """
        self._check_cache(kv_cache)
        cos, sin = self.rotary.cos_sin(positions, metadata.query_start_loc,
                                       metadata.context_lens)  # (T, head_dim // 2) each
        residual, delta = self.embed_tokens(input_ids), None  # (T, hidden); the stream is residual + delta
        for index, layer in enumerate(self.layers):
            residual, delta = layer(residual, delta, cos, sin, kv_cache.layer(index), metadata)
        return self.norm.add_and_norm(residual, delta)[1]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32; the matmul runs in the model dtype, as in HF.
        Collective over the TP group (the vocabulary is split): every TP rank must call it."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden)

    @torch.no_grad()
    def load_weights(self, reader: WeightReader) -> None:
        """Copy every tensor straight into its parameter; reject missing, misshapen and unknown
        tensors (an unknown one means the folder is not the model config.json describes)."""
        self.embed_tokens.load(reader, "model.embed_tokens.weight")
        for index, layer in enumerate(self.layers):
            layer.load(reader, f"model.layers.{index}.")
        self.norm.load(reader, "model.norm.")
        if self.lm_head is not None:
            self.lm_head.load(reader, "lm_head.weight")
        unexpected = [name for name in reader.unread() if not self._ignorable(name)]
        if unexpected:
            raise ModelFolderError(f"{reader.folder}: unexpected tensors in the checkpoint: "
                                   f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")

    def _ignorable(self, name: str) -> bool:
        # a tied checkpoint may still store lm_head.weight (a copy of the embedding)
        tied_copy = self.arch.tie_word_embeddings and name == "lm_head.weight"
        return tied_copy or name.endswith(_IGNORED_SUFFIXES)

    def _check_cache(self, kv_cache: KVCacheTensors) -> None:
        expected = (self.arch.num_hidden_layers, self.layers[0].self_attn.num_kv_heads,
                    self.arch.head_dim, self.dtype)
        actual = (kv_cache.num_layers, kv_cache.num_kv_heads, kv_cache.head_dim, kv_cache.dtype)
        if expected != actual:
            raise ValueError(f"KV cache (layers, kv_heads, head_dim, dtype) {actual} does not "
                             f"match the model's {expected}")
