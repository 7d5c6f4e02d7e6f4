"""One DeepSeek-V4 attention layer over the chunks of one or several sequences, each with its state.

    q  = rope(rms(q_b_proj(q_residual)))        q_residual = q_a_norm(q_a_proj(x))   (T, heads, D)
    kv = rope(kv_norm(kv_proj(x)))              one K = V head                       (T, D)
    per segment: window append, compressor append, indexer top-k (CSA)  on its own state, or for
                 the step's decodes on the pages all at once (paged_decodes.py)
    out = attend_chunk(q, window | compressed entries)     per chunk (chunk_cores.py); single-query
          segments (decodes) all at once: decode_attention.py                       (T, heads, D)
    out = rope^-1(out) at the query position    (V carries RoPE since V = K: undo it, so each
                                                 entry contributes by relative distance only)
    y  = o_b_proj(grouped o_a_proj(out))        heads in o_groups, each to o_lora_rank

Everything but the per-segment lines is token-wise: it runs once over all segments' tokens (each
token rotated at its own sequence's position), so a step of N decodes launches each projection,
norm and RoPE kernel once, not N times.

Sliding layers rotate with the "main" RoPE, CSA/HCA layers (and their compressors and indexer)
with the "compress" one. With tensor parallelism a rank holds heads / tp query heads, their sinks
and o_groups / tp output groups (o_b_proj is row-parallel: one all-reduce); the shared K = V head,
the compressors and so the whole state are replicated on every rank.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from model_shards.deepseek_v4.compressor import Compressor
from model_shards.deepseek_v4.decode_attention import decode_attention, paged_decode_attention
from model_shards.deepseek_v4.entries import ContiguousEntries, Entries
from model_folder.deepseek_v4_config import CSA, HCA, SLIDING, DeepseekV4Architecture
from model_shards.deepseek_v4.indexer import IndexerInputs, LightningIndexer
from model_shards.deepseek_v4.norm_rope import norm_and_rotate
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, LayerDecodes
from model_shards.deepseek_v4.norms import RMSNorm
from model_shards.deepseek_v4.kept_weights import GroupedProjection, Projection
from model_shards.deepseek_v4.positions import span_positions
from model_shards.deepseek_v4.rope import InterleavedRotary
from model_shards.deepseek_v4.sequence_split import SequenceSplit
from model_shards.deepseek_v4.chunk_cores import attend_chunk
from model_shards.deepseek_v4.kernel_choices import KernelChoices
from model_shards.deepseek_v4.sink_attention import CompressedKeys
from model_shards.deepseek_v4.state import LayerState, SlidingWindowState
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.parallel.groups import ParallelGroup


# a sequence's chunk: start position, token count, its layer state (None: a decode whose state
# lies on the pages, run with the step's other paged decodes: paged_decodes.py)
Segment = tuple[int, int, LayerState | None]
SegmentKeys = tuple[torch.Tensor, CompressedKeys | None]  # what its queries attend: window keys, compressed keys
Projected = tuple[torch.Tensor, torch.Tensor, IndexerInputs | None]  # compressor kv, gate (T, width); indexer inputs


@dataclass(frozen=True)
class ChunkRows:
    """One segment's inputs to its state: the KV-side rows of its whole chunk (kv (T_chunk, D);
    CSA / HCA: compressor kv, gate; CSA: indexer kv, gate (T_chunk, width)), the indexer's query
    rows of this rank's queries, and where those queries lie in the chunk (None: all of it)."""

    kv_side: list[torch.Tensor]
    index_queries: IndexerInputs | None
    queries: tuple[int, int] | None

    def indexer_inputs(self) -> IndexerInputs:
        """The queries' q and head weights with the whole chunk's indexer kv and gate."""
        return IndexerInputs(self.index_queries.q, self.index_queries.head_weights, *self.kv_side[3:5])

    def queries_window(self, window_keys: torch.Tensor, sliding_window: int) -> torch.Tensor:
        """The chunk's window keys (w + T_chunk, D) -> the rows this rank's queries reach: those of
        a chunk that starts at its first query (at most W - 1 rows before it)."""
        if self.queries is None:
            return window_keys
        first, stop = self.queries
        held = window_keys.shape[0] - self.kv_side[0].shape[0]  # rows before the chunk
        reach = min(held + first, sliding_window - 1)
        return window_keys[held + first - reach:held + stop]


class DeepseekV4Attention(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture, layer_type: str, tp: ParallelGroup, dtype: torch.dtype,
                 rotary: InterleavedRotary, kernels: KernelChoices = KernelChoices()):
        super().__init__()
        self.layer_type, self.tp, self.rotary = layer_type, tp, rotary
        self.chunk_core = kernels.chunk_attention  # a prefill chunk's softmax, sink and PV
        self.head_dim, self.eps = arch.head_dim, arch.rms_norm_eps
        self.sliding_window = arch.sliding_window
        self.num_heads = tp.split(arch.num_attention_heads, "num_attention_heads")
        self.num_groups = tp.split(arch.o_groups, "o_groups")
        self.scale = arch.head_dim ** -0.5
        self.q_a_proj = Projection(arch.hidden_size, arch.q_lora_rank, dtype)
        self.q_a_norm = RMSNorm(arch.q_lora_rank, arch.rms_norm_eps)
        self.q_b_proj = Projection(arch.q_lora_rank, self.num_heads * self.head_dim, dtype)
        self.kv_proj = Projection(arch.hidden_size, self.head_dim, dtype)
        self.kv_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        heads_per_group = arch.num_attention_heads // arch.o_groups
        self.o_a_proj = GroupedProjection(heads_per_group * self.head_dim, arch.o_lora_rank, self.num_groups, dtype)
        self.o_b_proj = Projection(self.num_groups * arch.o_lora_rank, arch.hidden_size, dtype, tp_sum=tp)
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.compressor = self.indexer = None
        if layer_type != SLIDING:
            self.compressor = Compressor(arch.hidden_size, self.head_dim, arch.compress_rate(layer_type),
                                         layer_type == CSA, arch.rms_norm_eps, dtype, rotary)
        if layer_type == CSA:
            self.indexer = LightningIndexer(arch, tp, dtype, rotary, kernels.index_top_k)

    def new_state(self, dtype: torch.dtype, device: torch.device) -> LayerState:
        window = SlidingWindowState(self.sliding_window - 1,
                                    torch.empty(0, self.head_dim, dtype=dtype, device=device))
        return LayerState(self.layer_type, window,
                          self.compressor and self.compressor.new_state(dtype, device),
                          self.indexer and self.indexer.compressor.new_state(dtype, device))

    def forward(self, x: torch.Tensor, start: int, state: LayerState) -> torch.Tensor:
        """x (T, hidden): the normed layer input of tokens at positions start .. start+T-1, the
        state holding tokens 0 .. start-1 (and afterwards tokens up to start+T-1) -> (T, hidden)."""
        positions = span_positions([(start, x.shape[0])], x.device)
        return self.forward_segments(x, [(start, x.shape[0], state)], positions)

    def forward_segments(self, x: torch.Tensor, segments: list[Segment], positions: torch.Tensor,
                         decodes: LayerDecodes | None = None, split: SequenceSplit | None = None) -> torch.Tensor:
        """x (T, hidden): several sequences' chunks one after another, `segments` their (start
        position, token count, state) in order, `positions` (T,) each token's position in its
        sequence (positions.span_positions) -> (T, hidden). Projections, norms and RoPE run once
        over all tokens; each segment's state is appended and its keys chosen on its own; the
        attention core runs once for all single-query segments (decodes) and once per longer chunk.
        `decodes`: the step's decodes on the pages (the segments whose state is None), whose
        appends and keys are batched too (paged_decodes.py). `split`: the chunks whose queries are
        split over the SP ranks (sequence_split.py); a split segment's (start, count) are this
        rank's queries, and its whole chunk is appended to the state."""
        tokens = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions)  # (T, rotary_dim // 2) each
        q_residual = self.q_a_norm(self.q_a_proj(x))  # (T, q_lora_rank)
        q = self.q_b_proj(q_residual).view(tokens, self.num_heads, self.head_dim)
        q = norm_and_rotate(q, cos, sin, "unweighted", self.eps)  # (T, heads, D)
        kv = norm_and_rotate(self.kv_proj(x), cos, sin, "weighted", self.kv_norm.eps, self.kv_norm.weight)  # (T, D)
        projected = self._project(x, q_residual, (cos, sin))
        bounds = list(itertools.accumulate((count for _, count, _ in segments), initial=0))
        own = [index for index, (_, _, state) in enumerate(segments) if state is not None]
        rows = [slice(bounds[index], bounds[index + 1]) for index in own]  # each segment on its own state
        out = None
        if rows:
            chunks = self._chunk_rows(kv, projected, rows, own, split)
            out = self._attend(q, rows, self._append_segments(chunks, [segments[index] for index in own]))
        if decodes is not None:
            out = self._merge(out, self._decode_on_pages(q, kv, projected, decodes), decodes.batch)
        out = norm_and_rotate(out, cos, -sin, "none")  # (T, heads, D), in place on a GPU
        grouped = self.o_a_proj(out.reshape(tokens, self.num_groups, -1))  # (T, groups, o_lora_rank)
        return self.o_b_proj(grouped.flatten(1))  # (T, hidden)

    def _project(self, x: torch.Tensor, q_residual: torch.Tensor,
                 cos_sin: tuple[torch.Tensor, torch.Tensor]) -> Projected | None:
        """The compressor's and indexer's token-wise inputs, once over all tokens (None: sliding)."""
        if self.compressor is None:
            return None
        index_inputs = None if self.indexer is None else self.indexer.project(x, q_residual, *cos_sin)
        return (*self.compressor.project(x), index_inputs)

    def _chunk_rows(self, kv: torch.Tensor, projected: Projected | None, rows: list[slice], indices: list[int],
                    split: SequenceSplit | None) -> list[ChunkRows]:
        """What each segment (`indices` into the step's segments, `rows` of the tokens) appends to
        its state: its rows of the KV-side inputs, or the whole chunk's where its queries are split
        over the SP ranks (gathered in one collective); the indexer's queries stay this rank's."""
        kv_side = [kv] if projected is None else [kv, projected[0], projected[1]]
        if projected is not None and projected[2] is not None:
            kv_side += [projected[2].kv, projected[2].gate]
        if split is None:
            per_segment = [[tensor[part] for tensor in kv_side] for part in rows]
        else:
            widths = [tensor.shape[1] for tensor in kv_side]
            whole = split.whole_chunks(torch.cat(kv_side, dim=1), rows, indices)  # (T_chunk, sum widths) each
            per_segment = [[column.contiguous() for column in chunk.split(widths, dim=1)] for chunk in whole]
        index_inputs = None if projected is None else projected[2]
        return [ChunkRows(parts, None if index_inputs is None else index_inputs.rows(part),
                          split.rows(index) if split is not None and index in split.pieces else None)
                for parts, part, index in zip(per_segment, rows, indices)]

    def _append_segments(self, chunks: list[ChunkRows], segments: list[Segment]) -> list[SegmentKeys]:
        """Each segment's chunk appended to its own state (window, compressor, indexer), the
        windows that close pooled at once -> per segment the keys its queries attend: window keys
        (w + T, D) and compressed keys."""
        window_keys = [chunk.queries_window(state.window.append(chunk.kv_side[0]), self.sliding_window)
                       for chunk, (_, _, state) in zip(chunks, segments)]
        if self.compressor is None:
            return [(keys, None) for keys in window_keys]
        entries = self.compressor.append([state.compressor for _, _, state in segments],
                                         [chunk.kv_side[1] for chunk in chunks], [chunk.kv_side[2] for chunk in chunks])
        return list(zip(window_keys, self._compressed_keys(entries, segments, chunks)))

    def _compressed_keys(self, entries: list[Entries], segments: list[Segment],
                         chunks: list[ChunkRows]) -> list[CompressedKeys]:
        """HCA: every closed entry (read once: 1 per m' tokens); CSA: the indexer's top-k of them."""
        starts = [start for start, _, _ in segments]
        if self.layer_type == HCA:
            return [CompressedKeys(ContiguousEntries(closed.read(0, closed.count)), first_position=start,
                                   rate=self.compressor.rate) for closed, start in zip(entries, starts)]
        selected = self.indexer.select([state.indexer for _, _, state in segments],
                                       [chunk.indexer_inputs() for chunk in chunks], starts)  # (T_i, k) each
        return [CompressedKeys(closed, selected=chosen) for closed, chosen in zip(entries, selected)]

    def _attend(self, q: torch.Tensor, rows: list[slice], keys: list[SegmentKeys]) -> torch.Tensor:
        """(T, heads, D) -> (sum of the rows, heads, D): every single-query segment (a decode) in
        one batched core, each longer chunk in its own."""
        singles = [index for index, part in enumerate(rows) if part.stop - part.start == 1]
        if singles:
            single_q = q if len(singles) == q.shape[0] else torch.cat([q[rows[i]] for i in singles])
            batched = decode_attention(single_q, [keys[i] for i in singles], self.sliding_window, self.sinks,
                                       self.scale)  # (singles, heads, D)
            if len(singles) == len(rows):
                return batched
            decoded = iter(batched.split(1))
        pieces = [next(decoded) if part.stop - part.start == 1 else
                  attend_chunk(self.chunk_core, q[part], window_keys, self.sliding_window, compressed, self.sinks,
                               self.scale)
                  for part, (window_keys, compressed) in zip(rows, keys)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _decode_on_pages(self, q: torch.Tensor, kv: torch.Tensor, projected: Projected | None,
                         decodes: LayerDecodes) -> torch.Tensor:
        """The step's N paged decodes: appends and key gathers as one op each over all N
        (paged_decodes.py), then one attention core -> (N, heads, D)."""
        pick = decodes.batch.pick  # the decodes' rows of the step's tokens
        groups = [decodes.append_window(pick(kv))]  # (N, W, D), (N, W)
        if projected is not None:
            compressor_kv, compressor_gate, index_inputs = projected
            self.compressor.append_decodes(decodes.compressor, pick(compressor_kv), pick(compressor_gate))
            if self.indexer is None:  # HCA: every closed entry
                groups.append(decodes.compressor.read_entries())
            else:
                picked = IndexerInputs(pick(index_inputs.q), pick(index_inputs.head_weights),
                                       pick(index_inputs.kv), pick(index_inputs.gate))
                selected = self.indexer.select_decodes(decodes.indexer, picked)  # (N, k)
                groups.append(decodes.compressor.gather(selected, self.indexer.topk))
        return paged_decode_attention(pick(q), groups, self.sinks, self.scale)

    @staticmethod
    def _merge(own: torch.Tensor | None, decoded: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """The step's (T, heads, D) from the paged decodes' rows and the other segments' rows."""
        if own is None:  # every token a paged decode, in order
            return decoded
        out = decoded.new_empty(own.shape[0] + decoded.shape[0], *decoded.shape[1:])
        out.index_copy_(0, batch.rows, decoded)
        return out.index_copy_(0, batch.other_rows, own)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        heads = dict(shard_dim=0, rank=self.tp.rank, world_size=self.tp.size)
        self.q_a_proj.load(reader, prefix + "wq_a.weight")
        self.q_a_norm.load(reader, prefix + "q_norm.weight")
        self.q_b_proj.load(reader, prefix + "wq_b.weight", **heads)
        self.kv_proj.load(reader, prefix + "wkv.weight")
        self.kv_norm.load(reader, prefix + "norm.weight")
        self.o_a_proj.load(reader, prefix + "wo_a.weight", **heads)
        self.o_b_proj.load(reader, prefix + "wo_b.weight", shard_dim=1, rank=self.tp.rank, world_size=self.tp.size)
        reader.copy_into(self.sinks.data, prefix + "attn_sink", **heads)
        if self.compressor is not None:
            self.compressor.load(reader, prefix + "compressor.")
        if self.indexer is not None:
            self.indexer.load(reader, prefix + "indexer.")
