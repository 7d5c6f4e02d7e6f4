"""DeepSeek-V4's paged KV cache on one rank: two pools of blocks, one per KV-cache block group.

    compressed (group 0, full, prefix-cached)     per block of B tokens and per layer:
        CSA   entries       (B / m, head_dim)        the block's compressed entries
              index_keys    (B / m, index_head_dim)  the Lightning Indexer's keys
        HCA   entries       (B / m', head_dim)
    window (group 1, sliding window of W - 1 tokens)  per block and per layer:
              keys          (B, head_dim)            raw K (= V) after kv_norm and RoPE
        CSA   overlap_kv    (m, head_dim)            first half (Ca) of the block's last window,
              overlap_gate  (m, head_dim) float32    which the next block's first entry overlaps
              index_overlap_kv / index_overlap_gate  the same for the indexer's compressor

B is a multiple of every compress rate (cluster/config.py resolves it), so a block boundary closes
every compression window: nothing is pending there, and a prefix of whole blocks resumes from
these pages alone (paged_state.py). The overlap halves sit in the window block that ends at the
boundary: a prefix hit always holds that block (its window reaches into it), and the compressed
group then holds exactly the entries that grow with the context, the config's bytes per token.
A third pool, of one slot per running request rather than blocks, holds the open compression
windows (`open_window_layout`): what a request carries from one chunk to the next besides pages.
Each block is one contiguous run of bytes holding every layer's fields (typed views into a uint8
tensor), so a tier moves a block with one copy, as the dense cache's block-major layout does
(model_shards/kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_folder.deepseek_v4_config import CSA, HCA, DeepseekV4Architecture
from model_shards.deepseek_v4.state import SequenceState

ALIGN = 16  # bytes: every field starts aligned for any dtype's typed view
GATE_DTYPE = torch.float32  # gate logits carry the float32 position bias


@dataclass(frozen=True)
class PageField:
    """One (rows, width) tensor of one layer inside every block of a pool."""

    layer: int
    name: str
    rows: int
    width: int
    dtype: torch.dtype
    offset: int  # bytes from the block's start

    @property
    def nbytes(self) -> int:
        return self.rows * self.width * self.dtype.itemsize


class PageLayout:
    """The byte layout of one block: fields placed back to back, each aligned."""

    def __init__(self, shapes: list[tuple[int, str, int, int, torch.dtype]]):
        self.fields: dict[tuple[int, str], PageField] = {}
        offset = 0
        for layer, name, rows, width, dtype in shapes:
            self.fields[layer, name] = PageField(layer, name, rows, width, dtype, offset)
            offset += -(-rows * width * dtype.itemsize // ALIGN) * ALIGN
        self.nbytes = max(ALIGN, offset)

    def describe(self) -> str:
        return ",".join(f"{f.layer}.{f.name}:{f.rows}x{f.width}:{str(f.dtype).removeprefix('torch.')}"
                        for f in self.fields.values())


def compressed_layout(arch: DeepseekV4Architecture, block_size: int, dtype: torch.dtype) -> PageLayout:
    shapes = []
    for layer, layer_type in enumerate(arch.layer_types):
        if layer_type in (CSA, HCA):
            shapes.append((layer, "entries", block_size // arch.compress_rate(layer_type), arch.head_dim, dtype))
        if layer_type == CSA:
            shapes.append((layer, "index_keys", block_size // arch.compress_rate(CSA), arch.index_head_dim, dtype))
    return PageLayout(shapes)


def window_layout(arch: DeepseekV4Architecture, block_size: int, dtype: torch.dtype) -> PageLayout:
    shapes = []
    for layer, layer_type in enumerate(arch.layer_types):
        shapes.append((layer, "keys", block_size, arch.head_dim, dtype))
        if layer_type == CSA:
            rate = arch.compress_rate(CSA)
            for prefix, dim in (("", arch.head_dim), ("index_", arch.index_head_dim)):
                shapes += [(layer, prefix + "overlap_kv", rate, dim, dtype),
                           (layer, prefix + "overlap_gate", rate, dim, GATE_DTYPE)]
    return PageLayout(shapes)


def open_window_layout(state: SequenceState) -> PageLayout:
    """One request's open compression windows (paged_state.OpenWindows), shaped after the model's
    empty state: per CSA / HCA layer and compressor ("" and the indexer's "index_"), the
    projections of the window being filled, pending_kv / pending_gate (m, width) (rows 0 .. n % m - 1
    hold them), and for an overlapping (CSA) compressor the first half of the last closed window,
    overlap_kv (m, dim) and overlap_gate (m, dim) float32 (gate -inf before the first one closes)."""
    shapes = []
    for layer, layer_state in enumerate(state.layers):
        for prefix, compressor in (("", layer_state.compressor), ("index_", layer_state.indexer)):
            if compressor is None:
                continue
            rate, (_, width), dtype = compressor.rate, compressor.pending_kv.shape, compressor.pending_kv.dtype
            shapes += [(layer, prefix + "pending_kv", rate, width, dtype),
                       (layer, prefix + "pending_gate", rate, width, dtype)]
            dim = compressor.entries.rows.shape[1]
            if width == 2 * dim:  # overlapping
                shapes += [(layer, prefix + "overlap_kv", rate, dim, dtype),
                           (layer, prefix + "overlap_gate", rate, dim, GATE_DTYPE)]
    return PageLayout(shapes)


class PagePool:
    """num_blocks blocks of one layout: a (num_blocks, nbytes) uint8 tensor, zeroed (a never
    written row must not hold NaN bit patterns), read and written through typed field views."""

    def __init__(self, layout: PageLayout, num_blocks: int, device: torch.device | str):
        self.layout, self.num_blocks = layout, num_blocks
        self.data = torch.zeros(num_blocks, layout.nbytes, dtype=torch.uint8, device=device)
        self._views: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def bytes_per_block(self) -> int:
        return self.layout.nbytes

    @property
    def device(self) -> torch.device:
        return self.data.device

    def view(self, layer: int, name: str) -> torch.Tensor:
        """(num_blocks, rows, width) typed view of one field in every block; no copy (made once:
        a decode step asks for every field of every layer)."""
        if (layer, name) not in self._views:
            field = self.layout.fields[layer, name]
            raw = self.data[:, field.offset:field.offset + field.nbytes]  # (num_blocks, nbytes)
            self._views[layer, name] = raw.view(field.dtype).view(self.num_blocks, field.rows, field.width)
        return self._views[layer, name]

    def block(self, block_id: int) -> torch.Tensor:
        """The contiguous bytes of one block (every layer's fields)."""
        return self.data[block_id]


@dataclass(frozen=True)
class PoolSizes:
    compressed_blocks: int
    window_blocks: int


def plan_pool_sizes(arch: DeepseekV4Architecture, block_size: int, budget_bytes: int, compressed_nbytes: int,
                    window_nbytes: int, max_num_seqs: int, max_tokens_per_step: int,
                    compressed_blocks: int | None = None) -> PoolSizes:
    """Blocks of each pool from a byte budget. The window pool needs, per running request, the
    blocks its window reaches back into plus the block being written, and a step's chunk once
    (all its blocks are held until the step ends): that many, at most half the budget; the rest
    holds compressed blocks, which grow with the context. `compressed_blocks` (cache.num_device_blocks)
    fixes the compressed pool instead."""
    blocks_in_window = -(-(arch.sliding_window - 1) // block_size)
    wanted = max_num_seqs * (blocks_in_window + 1) + -(-max_tokens_per_step // block_size) + blocks_in_window
    if compressed_blocks is not None:
        return PoolSizes(compressed_blocks, wanted)
    window_blocks = min(wanted, budget_bytes // 2 // window_nbytes)
    return PoolSizes((budget_bytes - window_blocks * window_nbytes) // compressed_nbytes, window_blocks)
