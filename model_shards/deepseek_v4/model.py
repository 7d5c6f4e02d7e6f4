"""DeepSeek-V4 causal LM over explicit per-request state (model_shards/deepseek_v4/state.py).

    streams = embed(ids) copied to hc_mult streams                        (T, hc, hidden)
    per layer:  x = attn_hc collapse -> attn_norm -> attention(state)     mix back into streams
                x = ffn_hc collapse  -> ffn_norm  -> MoE(x, ids)          mix back into streams
    hidden = norm(hyper_head(streams)); logits = head(hidden)

`forward` runs one chunk of one sequence (a whole prompt, any piece of it, or one decode token)
and appends it to that sequence's state; the result does not depend on how a sequence is cut
into chunks. `forward_segments` runs the chunks of several sequences in one pass: all but
attention is token-wise and runs once over their concatenated tokens; attention runs its
projections once too, and only what reads a sequence's state per segment (attention.py).
Tensor parallelism (`tp`) splits attention and indexer heads, experts (as expert parallelism over
the same group) and the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model_folder.errors import ModelFolderError
from model_folder.hf_config import load_architecture
from model_shards.deepseek_v4.attention import DeepseekV4Attention, Segment
from model_folder.deepseek_v4_config import SLIDING, DeepseekV4Architecture
from model_shards.deepseek_v4.kept_weights import DeferredParameters, deferred_linear_bytes
from model_shards.deepseek_v4.kernel_choices import KernelChoices
from model_shards.deepseek_v4.hyper_connections import HyperConnection, HyperHead, mix_streams
from model_shards.deepseek_v4.moe import MixtureOfExperts
from model_shards.deepseek_v4.norms import RMSNorm
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, LayerDecodes
from model_shards.deepseek_v4.positions import span_positions
from model_shards.deepseek_v4.rope import InterleavedRotary
from model_shards.deepseek_v4.sequence_split import SequenceSplit
from model_shards.deepseek_v4.state import SequenceState
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.llama import checkpoint_dtype
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.tensor_parallel import VocabParallelEmbedding
from model_shards.weights import WeightReader


class DeepseekV4DecoderLayer(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture, index: int, tp: ParallelGroup, dtype: torch.dtype,
                 rotary: InterleavedRotary, kernels: KernelChoices = KernelChoices()):
        super().__init__()
        self.attn_hc = HyperConnection(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = DeepseekV4Attention(arch, arch.layer_types[index], tp, dtype, rotary, kernels)
        self.ffn_hc = HyperConnection(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MixtureOfExperts(arch, arch.mlp_layer_types[index], tp, dtype)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor, segments: list[Segment],
                positions: torch.Tensor, decodes: LayerDecodes | None = None,
                split: SequenceSplit | None = None) -> torch.Tensor:
        """streams (T, hc, hidden) of the segments' tokens one after another -> (T, hc, hidden);
        `segments` holds each segment's (start position, token count, state), in order,
        `positions` (T,) each token's position in its sequence, `decodes` the paged decodes,
        `split` the chunks split over the SP ranks (everything but attention is token-wise)."""
        post, comb, collapsed = self.attn_hc(streams)
        attended = self.self_attn.forward_segments(self.input_layernorm(collapsed), segments, positions, decodes,
                                                   split)
        streams = mix_streams(streams, attended, post, comb)
        post, comb, collapsed = self.ffn_hc(streams)
        return mix_streams(streams, self.mlp(self.post_attention_layernorm(collapsed), input_ids), post, comb)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        self.attn_hc.load(reader, prefix + "hc_attn")
        self.input_layernorm.load(reader, prefix + "attn_norm.weight")
        self.self_attn.load(reader, prefix + "attn.")
        self.ffn_hc.load(reader, prefix + "hc_ffn")
        self.post_attention_layernorm.load(reader, prefix + "ffn_norm.weight")
        self.mlp.load(reader, prefix + "ffn.")


class DeepseekV4ForCausalLM(nn.Module):
    """Parameters are uninitialized until `load_weights` (or use `from_folder`)."""

    def __init__(self, arch: DeepseekV4Architecture, dtype: torch.dtype, device: torch.device | str,
                 tp: ParallelGroup | None = None, keep_quantized: bool = False,
                 kernels: KernelChoices = KernelChoices()):
        """keep_quantized: weights the checkpoint stores with block scales stay in their format
        (model.quantized_weights: keep; kept_weights.py), allocated at load only. kernels: which
        attention core and top-k method the layers run (kernel_choices.py)."""
        super().__init__()
        self.arch, self.dtype, self.tp = arch, dtype, tp or ParallelGroup.single()
        self.keep_quantized = keep_quantized
        main_rope = InterleavedRotary(arch.main_rope, arch.max_position_embeddings, dtype, device)
        compress_rope = InterleavedRotary(arch.compress_rope, arch.max_position_embeddings, dtype, device)
        with torch.device("meta"):  # storage is allocated once below, never randomly initialised
            self.embed = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, self.tp).to(dtype)
            self.layers = nn.ModuleList(
                DeepseekV4DecoderLayer(arch, index, self.tp, dtype, main_rope if layer_type == SLIDING else compress_rope,
                                       kernels)
                for index, layer_type in enumerate(arch.layer_types))
            self.hc_head = HyperHead(arch)
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
            self.head = self.embed if arch.tie_word_embeddings else VocabParallelEmbedding(
                arch.vocab_size, arch.hidden_size, self.tp).to(dtype)
        if keep_quantized:
            for module in self.modules():
                if isinstance(module, DeferredParameters):
                    module.defer(device)
        self.to_empty(device=device)
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", tp: ParallelGroup | None = None,
                    keep_quantized: bool = False, kernels: KernelChoices = KernelChoices()) -> DeepseekV4ForCausalLM:
        arch = load_architecture(folder)
        if not isinstance(arch, DeepseekV4Architecture):
            raise ModelFolderError(f"{folder}: not a DeepSeek-V4 folder ({arch.architecture})")
        model = cls(arch, dtype or checkpoint_dtype(arch), device, tp, keep_quantized, kernels)
        with WeightReader(folder) as reader:
            model.load_weights(reader)
        return model

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def weight_nbytes(self) -> int:
        """Bytes of this rank's weights on the device: parameters, buffers and the weights kept
        quantized (values and scales)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(tensor.nbytes for tensor in tensors) + deferred_linear_bytes(self)

    def new_state(self) -> SequenceState:
        """The state of a request before its first token."""
        return SequenceState(0, [layer.self_attn.new_state(self.dtype, self.device) for layer in self.layers])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, state: SequenceState) -> torch.Tensor:
        """The next chunk of one sequence, input_ids (T,) at positions state.num_tokens onwards ->
        final hidden states (T, hidden); `state` then holds the chunk too."""
        return self.forward_segments([(input_ids, state)])

    @torch.inference_mode()
    def forward_segments(self, segments: list[tuple[torch.Tensor, SequenceState | None]],
                         decodes: DecodeBatch | None = None, split: SequenceSplit | None = None) -> torch.Tensor:
        """The next chunk of several sequences in one pass: [(input_ids (T_i,), state), ...] ->
        final hidden states (sum T_i, hidden), the segments' rows in order. Everything but attention
        is token-wise, so it runs once over all tokens (every weight read once); attention reads
        each segment's own state (DeepseekV4Attention.forward_segments). Each state then holds its
        chunk too. A state None: a single token decoding on the pages, one of `decodes` (in order).
        `split`: under sequence parallelism, the segments whose input_ids are this rank's piece of
        their chunk (sequence_split.py); their states take the whole chunk."""
        input_ids = segments[0][0] if len(segments) == 1 else torch.cat([ids for ids, _ in segments])
        decode_starts = iter(decodes.positions if decodes is not None else ())
        spans = [(next(decode_starts) if state is None else state.num_tokens + self._first_row(split, index),
                  ids.shape[0], state) for index, (ids, state) in enumerate(segments)]  # (start, count, state)
        positions = span_positions([(start, count) for start, count, _ in spans], input_ids.device)  # (T,)
        hidden = self._layers(input_ids, spans, positions, decodes, split)
        for index, (ids, state) in enumerate(segments):
            if state is not None:
                split_chunk = split is not None and index in split.pieces
                state.num_tokens += split.pieces[index].count if split_chunk else ids.shape[0]
        if decodes is not None:
            decodes.finish()
        return hidden

    @staticmethod
    def _first_row(split: SequenceSplit | None, index: int) -> int:
        """Where this rank's rows of segment `index` start in its chunk (0 unless split)."""
        return split.rows(index)[0] if split is not None and index in split.pieces else 0

    @torch.inference_mode()
    def forward_decodes(self, decodes: DecodeBatch) -> torch.Tensor:
        """A step of single tokens that all decode on the pages, every input on the device
        (a static_decodes.StaticDecodeBatch: its token ids and positions) -> (N, hidden). No host
        int is read, so it can be captured; the caller runs `decodes.finish()` after it."""
        ids = decodes.token_ids
        return self._layers(ids, [(0, ids.shape[0], None)], decodes.token_positions, decodes)

    def _layers(self, input_ids: torch.Tensor, spans: list[tuple[int, int, SequenceState | None]],
                positions: torch.Tensor, decodes: DecodeBatch | None, split: SequenceSplit | None = None) -> torch.Tensor:
        """Embedding, every layer and the final norm over the tokens of `spans` (start, count, state)."""
        streams = self.embed(input_ids).unsqueeze(1).expand(-1, self.arch.hc_mult, -1).contiguous()
        for index, layer in enumerate(self.layers):
            layer_segments = [(start, count, state and state.layers[index]) for start, count, state in spans]
            layer_decodes = decodes.layer(index) if decodes is not None else None
            streams = layer(streams, input_ids, layer_segments, positions, layer_decodes, split)  # (T, hc, hidden)
        return self.norm(self.hc_head(streams))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32. Collective over the TP group (vocabulary split)."""
        return self.head.logits(hidden)

    @torch.no_grad()
    def load_weights(self, reader: WeightReader) -> None:
        """Copy every tensor into its parameter; reject missing, misshapen and unknown tensors."""
        tensors = CheckpointTensors(reader, keep_quantized=self.keep_quantized)
        self.embed.load(tensors, "embed.weight")
        for index, layer in enumerate(self.layers):
            layer.load(tensors, f"layers.{index}.")
        self.hc_head.load(tensors, "hc_head")
        self.norm.load(tensors, "norm.weight")
        if not self.arch.tie_word_embeddings:
            self.head.load(tensors, "head.weight")
        elif tensors.has("head.weight"):
            tensors.get("head.weight")  # a tied checkpoint may still store the copy
        if unused := tensors.unused():
            raise ModelFolderError(f"{reader.folder}: unexpected tensors in the checkpoint: {unused[:10]}"
                                   f"{' ...' if len(unused) > 10 else ''}")
