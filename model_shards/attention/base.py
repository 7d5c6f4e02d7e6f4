"""What every attention backend is given for one step, and the interface it implements.

One step runs a flattened batch: sequence i contributes rows query_start_loc[i]:query_start_loc[i+1]
of the (T, ...) tensors, either a prefill chunk or one decode token. Region map of sequence i:

    positions 0 ............ computed-1 | computed ........ context_len-1
              already in the KV cache   | new this step (written, then attended)

The query at absolute position p attends to keys 0..p of its own sequence only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat

import torch

from model_shards.device import host_to_device, upload_packed


@dataclass
class AttentionMetadata:
    query_start_loc: list[int]  # (num_seqs + 1,) row offsets of each sequence's new tokens
    context_lens: list[int]  # tokens of sequence i in the cache after this step (computed + new)
    slot_mapping: torch.Tensor  # (T,) long: block_id * block_size + offset for each new token
    positions: torch.Tensor  # (T,) long: absolute position of each new token
    block_table_tensor: torch.Tensor  # (num_seqs, max_blocks) long, rows padded with 0
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @cached_property
    def num_decode_seqs(self) -> int:
        """How many leading sequences have one new token (the scheduler puts decodes first)."""
        count = 0
        while count < self.num_seqs and self.query_start_loc[count + 1] - self.query_start_loc[count] == 1:
            count += 1
        return count

    @cached_property
    def seq_lens_tensor(self) -> torch.Tensor:
        """(num_seqs,) int32 on the device: context_lens, for kernels; built once per step."""
        return host_to_device(torch.tensor(self.context_lens, dtype=torch.int32), self.slot_mapping.device)

    def num_blocks_of(self, seq_index: int) -> int:
        """Blocks that hold sequence i's context (its table may list more, allocated ahead)."""
        return -(-self.context_lens[seq_index] // self.block_size)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, int]], block_size: int,
              device: torch.device | str) -> AttentionMetadata:
        """From (block_table, num_computed_before, num_new) per sequence, in batch order."""
        return cls.build_with_inputs(seqs, block_size, device, [])[0]

    @classmethod
    def build_with_inputs(cls, seqs: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str,
                          token_ids: Sequence[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """The metadata and the step's token ids (T,) long on `device`.

        Index arithmetic runs vectorized on the host (no Python loop over tokens); every tensor
        then reaches the device in one pinned copy that the host does not wait for.
        """
        query_start_loc, context_lens = [0], []
        positions, slots = _SegmentedLongs(), _SegmentedLongs()
        offsets = torch.arange(block_size)  # (block_size,)
        for block_table, computed, new in seqs:
            _check_sequence(block_table, computed, new, block_size)
            if new <= _SHORT_CHUNK_TOKENS:  # decodes (one token) and short chunks: plain ints
                positions.extend(range(computed, computed + new))
                slots.extend(_short_slots(block_table, computed, new, block_size))
            else:
                positions.add(torch.arange(computed, computed + new))  # (new,)
                slots.add(_slots(block_table, computed, new, block_size, offsets))
            query_start_loc.append(query_start_loc[-1] + new)
            context_lens.append(computed + new)
        slot_mapping, positions_tensor, block_table_tensor, input_ids = upload_packed(
            [slots.tensor(), positions.tensor(), padded_block_tables([table for table, _, _ in seqs]),
             long_tensor(token_ids)], device)
        metadata = cls(
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            slot_mapping=slot_mapping,
            positions=positions_tensor,
            block_table_tensor=block_table_tensor,
            block_size=block_size,
        )
        return metadata, input_ids


# A sequence with at most this many new tokens gets its positions and slots as Python ints: a
# decode row's few torch calls cost ~40 us of host time, 2.4 ms for a mixed step's 60 decodes.
_SHORT_CHUNK_TOKENS = 16


class _SegmentedLongs:
    """A (total,) int64 host tensor built from runs of Python ints and from tensors, in order."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._run = array("q")

    def extend(self, values: Iterable[int]) -> None:
        self._run.extend(values)

    def add(self, part: torch.Tensor) -> None:
        self._close_run()
        self._parts.append(part)

    def tensor(self) -> torch.Tensor:
        self._close_run()
        return _cat(self._parts)

    def _close_run(self) -> None:
        if self._run:
            self._parts.append(_from_int64_array(self._run))
            self._run = array("q")


def _short_slots(block_table: list[int], computed: int, new: int, block_size: int) -> list[int]:
    """The cache slots of positions computed .. computed + new - 1, as ints."""
    return [block_table[position // block_size] * block_size + position % block_size
            for position in range(computed, computed + new)]


def _slots(block_table: list[int], computed: int, new: int, block_size: int, offsets: torch.Tensor) -> torch.Tensor:
    """(new,) long: the cache slot of positions computed .. computed + new - 1. Only the blocks
    they touch are read from the table (a decode touches one of a 1M-token table's 16,384)."""
    first, last = computed // block_size, (computed + new - 1) // block_size
    blocks = long_tensor(block_table[first:last + 1])  # (touched,)
    start = computed - first * block_size
    return (blocks[:, None] * block_size + offsets).flatten()[start:start + new]


def _check_sequence(block_table: list[int], computed: int, new: int, block_size: int) -> None:
    if computed < 0 or new < 1:
        raise ValueError(f"a sequence needs num_computed >= 0 and num_new >= 1, got "
                         f"{computed} and {new}")
    if len(block_table) * block_size < computed + new:
        raise ValueError(f"block table of {len(block_table)} blocks cannot hold "
                         f"{computed + new} tokens at block_size {block_size}")


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def long_tensor(values: Sequence[int]) -> torch.Tensor:
    """(len,) int64 on the host from Python ints, through an array: 4x faster than torch.tensor
    on a list (32K token ids: 0.5 against 1.9 ms on the 2-core CI machine). An int64 array (token
    ids, block tables) is shared, not copied: array("q", an array) would walk it item by item."""
    if isinstance(values, array) and values.typecode == "q":
        return _from_int64_array(values)
    return _from_int64_array(array("q", values))


def _from_int64_array(flat: array) -> torch.Tensor:
    """(len,) int64 sharing the array's memory (frombuffer refuses an empty one)."""
    return torch.frombuffer(flat, dtype=torch.long) if flat else torch.empty(0, dtype=torch.long)


# Block tables are TABLE_WIDTH_MULTIPLE entries wide or a multiple of it: Triton specializes a
# kernel on whether each integer argument is 1 or a multiple of 16, the table's row stride among
# them, so a step's width would otherwise pick one of two compiled variants of the paged decode
# kernel by chance, the second compiled inside some request (~0.4 s on an H100, session 15).
TABLE_WIDTH_MULTIPLE = 16


def table_width(max_blocks: int) -> int:
    """Entries per row of a block table for sequences of up to `max_blocks` blocks."""
    return max(1, -(-max_blocks // TABLE_WIDTH_MULTIPLE)) * TABLE_WIDTH_MULTIPLE


def padded_block_tables(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """(num_seqs, table_width) long on the host, rows padded with 0: built every step, so from one
    flat int64 array (4x faster than torch.tensor on a list: a 1M-token table has 4096+ entries).
    A worker keeps its tables as array('q') (step_batch.RequestState): each row is then one memcpy
    (60 rows of 517: 1.6 ms as lists, session 15, on the 2-core CI machine)."""
    width = table_width(max((len(table) for table in tables), default=0))
    flat = array("q")
    for table in tables:
        flat.extend(table if isinstance(table, array) else array("q", table))
        flat.extend(repeat(0, width - len(table)))
    return _from_int64_array(flat).view(len(tables), width)


def write_kv(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V (T, kv_heads, head_dim) in layer_cache
    (num_blocks, 2, block_size, kv_heads, head_dim) at their slots."""
    block_size = layer_cache.shape[2]
    block_ids = slot_mapping // block_size  # (T,)
    offsets = slot_mapping % block_size  # (T,)
    # The layer view is strided across blocks (other layers sit between), so index (block, offset)
    # instead of flattening slots; index_put_ writes through the view into the shared tensor.
    layer_cache[block_ids, 0, offsets] = key.to(layer_cache.dtype)
    layer_cache[block_ids, 1, offsets] = value.to(layer_cache.dtype)


class AttentionBackend(ABC):
    """Paged causal attention over a flattened batch."""

    # True when a step of decodes reads only device tensors of the metadata (no host lists but
    # context_lens as an upper bound), so the step can be captured as a CUDA graph.
    graph_safe_decode = False

    def warm_up(self, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                block_size: int, step_tokens: int, max_model_len: int) -> int:
        """Prepare what the kernels would otherwise prepare inside a request (per-shape plans), for
        chunks of up to step_tokens over contexts of up to max_model_len; returns how many things
        were prepared. Default: nothing."""
        return 0

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """query (T, heads, head_dim), key/value (T, kv_heads, head_dim), layer_cache
        (num_blocks, 2, block_size, kv_heads, head_dim) -> (T, heads, head_dim).

        Writes the new K/V into layer_cache at metadata.slot_mapping, then lets each new token
        attend causally to its sequence's whole context (cached + new)."""
