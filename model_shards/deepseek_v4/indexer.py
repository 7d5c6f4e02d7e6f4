"""The Lightning Indexer of CSA layers: which compressed entries each query attends (paper §2.3.1).

    score(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . K_s) / sqrt(index_head_dim),  w = weights_proj(x) / sqrt(heads)

over the indexer's own compressed keys K (an overlapping compressor at index_head_dim); each query
keeps the `index_topk` best entries among those already closed at its position. With tensor
parallelism each rank holds index_n_heads / tp heads and the per-head sums are all-reduced before
the top-k, so every rank selects the same entries.

A decode step's single-query segments are scored together: one score pass over all their
entries (index_scores.decode_index_scores) and one top-k, not one of each per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from model_shards.deepseek_v4.compressor import Compressor
from model_shards.deepseek_v4.entries import Entries
from model_shards.deepseek_v4.kept_weights import Projection
from model_folder.deepseek_v4_config import CSA, DeepseekV4Architecture
from model_shards.deepseek_v4.norm_rope import norm_and_rotate
from model_shards.deepseek_v4.rope import InterleavedRotary
from model_shards.deepseek_v4.index_scores import decode_index_scores, index_scores, ranking_keys
from model_shards.deepseek_v4.sink_attention import block_elements
from model_shards.deepseek_v4.state import CompressorState
from model_shards.deepseek_v4.threshold_top_k import top_k_by_threshold
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.parallel.groups import ParallelGroup

if TYPE_CHECKING:
    from model_shards.deepseek_v4.paged_decodes import DecodeWindows

NO_ENTRY = -1  # a selection slot without an entry (fewer closed entries than index_topk)


@dataclass(frozen=True)
class IndexerInputs:
    """The indexer's token-wise inputs, one row per token: queries after RoPE (T, heads, head_dim),
    head weights (T, heads) float32, and its compressor's projections kv, gate (T, width)."""

    q: torch.Tensor
    head_weights: torch.Tensor
    kv: torch.Tensor
    gate: torch.Tensor

    def rows(self, rows: slice) -> IndexerInputs:
        """One sequence's rows (a view of each)."""
        return IndexerInputs(self.q[rows], self.head_weights[rows], self.kv[rows], self.gate[rows])


class LightningIndexer(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture, tp: ParallelGroup, dtype: torch.dtype,
                 rotary: InterleavedRotary, top_k_method: str = "threshold"):
        """top_k_method: how a prefill chunk's choice is taken (kernel_choices.py): ranked, int64
        keys written by the scores kernel; threshold, float32 scores (threshold_top_k.py)."""
        super().__init__()
        self.tp, self.top_k_method = tp, top_k_method
        self.num_heads = tp.split(arch.index_n_heads, "index_n_heads")  # this rank's
        self.head_dim = arch.index_head_dim
        self.topk = arch.index_topk
        self.rate = arch.compress_rate(CSA)
        self.score_scale = arch.index_head_dim ** -0.5
        self.head_weight_scale = arch.index_n_heads ** -0.5  # over all heads, not this rank's
        self.compressor = Compressor(arch.hidden_size, arch.index_head_dim, self.rate, True, arch.rms_norm_eps,
                                     dtype, rotary)
        self.q_b_proj = Projection(arch.q_lora_rank, self.num_heads * self.head_dim, dtype)
        self.weights_proj = Projection(arch.hidden_size, self.num_heads, dtype)

    def project(self, x: torch.Tensor, q_residual: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> IndexerInputs:
        """The token-wise part, over any tokens (several sequences' chunks at once): x (T, hidden),
        q_residual (T, q_lora_rank), cos / sin (T, rotary_dim // 2) of each token's position."""
        tokens = x.shape[0]
        q = self.q_b_proj(q_residual).view(tokens, self.num_heads, self.head_dim)
        q = norm_and_rotate(q, cos, sin, "none")  # (T, heads, head_dim), in place on a GPU
        head_weights = self.weights_proj(x).float() * (self.head_weight_scale * self.score_scale)  # (T, heads)
        return IndexerInputs(q, head_weights, *self.compressor.project(x))

    def select(self, states: list[CompressorState], inputs: list[IndexerInputs],
               starts: list[int]) -> list[torch.Tensor]:
        """Fold each sequence's chunk (its rows of `project`, tokens at positions start ..) into its
        indexer keys, then pick each query's entries: per sequence (T_i, min(topk, E_i)) indices,
        NO_ENTRY where a query has fewer closed entries."""
        keys = self.compressor.append(states, [rows.kv for rows in inputs], [rows.gate for rows in inputs])
        decodes = [index for index, rows in enumerate(inputs) if rows.q.shape[0] == 1]
        chosen = dict(zip(decodes, self._choose_decodes([keys[i] for i in decodes], [inputs[i] for i in decodes])))
        return [chosen[index] if index in chosen else self._choose(*args)
                for index, args in enumerate(zip(keys, inputs, starts))]

    def select_decodes(self, windows: DecodeWindows, inputs: IndexerInputs) -> torch.Tensor:
        """A paged decode step (paged_decodes.py): fold the N decodes' rows into their indexer keys,
        then each one's choice among them at once: (N, min(topk, E_max)) ascending, row i's first
        min(topk, E_i) its own (as _choose_decodes)."""
        self.compressor.append_decodes(windows, inputs.kv, inputs.gate)
        if self.tp.size == 1:
            ranked = windows.index_scores(inputs.q, inputs.head_weights, ranked=True)  # (N, E_max)
        else:
            ranked = ranking_keys(self.tp.all_reduce(windows.index_scores(inputs.q, inputs.head_weights, False)))
        return top_k_of_ranking(ranked, min(self.topk, ranked.shape[1]))

    def _choose_decodes(self, keys: list[Entries], inputs: list[IndexerInputs]) -> list[torch.Tensor]:
        """N decodes' choices at once, (1, min(topk, E_i)) each: every entry of a decode is closed
        at its position, so one (N, E_max) score block, -inf past E_i, and one top-k over it;
        a row's -inf padding ranks below all its entries, so its first min(topk, E_i) ascending
        picks are exactly its own choice."""
        if not keys:
            return []
        q = torch.cat([rows.q for rows in inputs])  # (N, heads, head_dim)
        head_weights = torch.cat([rows.head_weights for rows in inputs])  # (N, heads)
        if self.tp.size == 1:
            ranked = decode_index_scores(q, head_weights, keys, ranked=True)  # (N, E_max)
        else:
            ranked = ranking_keys(self.tp.all_reduce(decode_index_scores(q, head_weights, keys)))
        chosen = top_k_of_ranking(ranked, min(self.topk, ranked.shape[1]))  # (N, min(topk, E_max)) ascending
        return [chosen[row:row + 1, :min(self.topk, entries.count)] for row, entries in enumerate(keys)]

    def _choose(self, keys: Entries, inputs: IndexerInputs, start: int) -> torch.Tensor:
        """One sequence's chunk's choice (T, min(topk, E)) among its E keys (rows of head_dim, where they lie)."""
        q, head_weights = inputs.q, inputs.head_weights
        tokens, device = q.shape[0], q.device
        width = min(self.topk, keys.count)
        # (queries, entries) scores in bounded blocks: never a (tokens x entries) matrix at once
        block = max(1, block_elements(device) // max(1, keys.count))
        chosen = torch.full((tokens, width), NO_ENTRY, dtype=torch.long, device=device)
        for i in range(0, tokens, block):
            stop = min(tokens, i + block)
            closed = (start + stop) // self.rate  # entries closed at the block's last query (host int)
            picked = self._top_k(q[i:stop], head_weights[i:stop], keys.head(closed), start + i)
            visible = (torch.arange(start + i, start + stop, device=device) + 1) // self.rate  # (t,)
            chosen[i:stop, :picked.shape[1]] = picked.masked_fill(picked >= visible[:, None], NO_ENTRY)
        return chosen

    def _top_k(self, q: torch.Tensor, head_weights: torch.Tensor, keys: Entries,
               first_position: int) -> torch.Tensor:
        """(t, min(topk, E_b)) earliest-first best entries of queries at first_position .."""
        width = min(self.topk, keys.count)
        if self.tp.size == 1 and self.top_k_method == "ranked":  # scores ranked as they are computed
            ranked = index_scores(q, head_weights, keys, first_position, self.rate, ranked=True)
            return top_k_of_ranking(ranked, width)
        # every rank holds some heads: the scores summed over ranks first
        scores = self.tp.all_reduce(index_scores(q, head_weights, keys, first_position, self.rate))
        if self.top_k_method == "threshold":
            return top_k_by_threshold(scores, width)
        return top_k_of_ranking(ranking_keys(scores), width)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        shard = dict(shard_dim=0, rank=self.tp.rank, world_size=self.tp.size)
        self.compressor.load(reader, prefix + "compressor.")
        self.q_b_proj.load(reader, prefix + "wq_b.weight", **shard)
        self.weights_proj.load(reader, prefix + "weights_proj.weight", **shard)


def top_k_earliest_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (t, k) of each row's k largest scores, ties at the k-th value going to the earliest
    entries, in ascending index order (attention does not care about the order).

    Why not plain topk: ReLU makes exact ties common (an entry every head scores below zero gets
    exactly 0), and torch.topk breaks ties by the row's length. transformers' full forward scores
    every query against the whole sequence's entries, so there a query's choice, and its logits,
    change with tokens that come after it. Earliest-first is causal, so any chunking, prefix hit
    or decode order chooses alike; it equals transformers wherever the k-th score is not tied."""
    return top_k_of_ranking(ranking_keys(scores), k)


def top_k_of_ranking(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """One topk over int64 ranking keys (index_scores.ranking_keys) -> ascending indices (t, k)."""
    if k == 0:
        return ranked.new_empty(ranked.shape[0], 0)
    return ranked.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
