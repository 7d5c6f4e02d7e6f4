"""DeepSeek-V4 decode steps as CUDA graphs, one per (batch bucket, context bucket); one class owns
every static buffer (as model_shards/cuda_graphs.py does for the dense models).

A step in which every scheduled request decodes one token from its slot (paged_decodes.py) pads
to the smallest batch bucket >= N (cuda_graphs.graph_batch_sizes) and to the context bucket of
its longest request (static_decodes.context_bucket: a power of two), fills that key's packed input
buffer (one host-to-device copy) and replays the key's graph: the whole forward pass to the final
hidden states in one launch. Padded rows and windows that do not close write into a scratch
slot and a scratch block of each pool, which no request owns (the worker allocates them).

Keys: len(sizes) x log2(max_model_len / block) at most (15 x 13 for 256 requests and 1M tokens at
128 a block). `capture` takes the keys given at worker start (the small ones); any other key is
captured at its first step (a warm-up run and a capture: tens of ms once). All graphs share one
memory pool: their activations never live at once. Without CUDA the same static step runs
eagerly (tests of the logic on a CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from model_shards.cuda_graphs import DeviceBlockTables, bucket_for, graph_batch_sizes
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_decodes import PagedDecode
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.static_decodes import (DecodeShape, Scratch, StaticDecodeBatch, StaticDecodeInputs,
                                                     StaticDecodeKey, context_bucket)

LOG = logging.getLogger(__name__)
WARM_UP_RUNS = 2  # compile the Triton kernels and settle cuBLAS before a capture
# Captured at worker start: 5 batch buckets x 6 context buckets at 128 a block (30 graphs, each a
# warm-up and a capture); a step past them captures its key once, at its first step.
START_ROWS, START_CONTEXT = 8, 4096


def decode_rates(pages: PagedKV) -> tuple[int, ...]:
    """The compress rates whose open windows the slots hold (CSA, HCA)."""
    return tuple(sorted({field.rows for (_, name), field in pages.open_windows.fields().items()
                         if name.endswith("pending_kv")}))


def _check_scratch(block: int, num_blocks: int, pool: str) -> None:
    """A scratch id past its pool would fail as a device-side assert inside the first capture, and
    that poisons the CUDA context for every later step: refuse it here, on the host."""
    if not 0 <= block < num_blocks:
        raise ValueError(f"decode graphs: scratch block {block} is not in the {pool} pool of {num_blocks} blocks")


class DeepseekV4DecodeGraphs:
    """Static inputs, captured graphs and outputs per key; `run` replays the right one."""

    def __init__(self, model: DeepseekV4ForCausalLM, pages: PagedKV, scratch_blocks: tuple[int, int],
                 max_batch: int, max_model_len: int, max_requests: int):
        """`scratch_blocks`: (compressed, window) block ids no request is given. Takes a scratch
        slot and grows the open-window pool to hold max_requests more slots, so that no request's
        arrival reallocates what the graphs read."""
        self.model, self.pages = model, pages
        self.device = pages.compressed.device
        self.sizes = graph_batch_sizes(max_batch)
        self.max_context = context_bucket([max_model_len - 1], pages.block_size)
        pages.open_windows.reserve(max_requests + 1, model.new_state)
        compressed_scratch, window_scratch = scratch_blocks  # by name: Scratch orders them the other way
        _check_scratch(compressed_scratch, pages.compressed.num_blocks, "compressed")
        _check_scratch(window_scratch, pages.window.num_blocks, "window")
        self.scratch = Scratch(pages.open_windows.take(model.new_state), window_block=window_scratch,
                               compressed_block=compressed_scratch)
        self.shape = DecodeShape(model.arch.sliding_window, pages.block_size, decode_rates(pages))
        max_blocks = -(-self.max_context // pages.block_size)
        self.tables = DeviceBlockTables(max_requests, max_blocks, self.device, torch.long)
        self.inputs: dict[StaticDecodeKey, StaticDecodeInputs] = {}
        self.graphs: dict[StaticDecodeKey, Callable[[], torch.Tensor]] = {}  # replays
        self.capture_error: str | None = None  # set by a failed capture: no graphs from then on
        self._pool = None  # the graphs' shared memory pool
        self._slot_memory = pages.open_windows.pool.data.data_ptr()

    def key_for(self, positions: list[int]) -> StaticDecodeKey | None:
        """The key of a step of decodes at `positions` (None: more than the largest bucket)."""
        rows = bucket_for(len(positions), self.sizes)
        context = context_bucket(positions, self.pages.block_size)
        return None if rows is None or context > self.max_context else StaticDecodeKey(rows, context)

    def start_keys(self) -> list[StaticDecodeKey]:
        """The keys captured at worker start: up to START_ROWS requests, contexts up to
        START_CONTEXT tokens (a short chat's steps replay from its first token); others lazily."""
        contexts = [context for context in (self.pages.block_size << shift for shift in range(32))
                    if context <= min(START_CONTEXT, self.max_context)]
        return [StaticDecodeKey(rows, context) for rows in self.sizes if rows <= START_ROWS for context in contexts]

    def capture(self, keys: Iterable[StaticDecodeKey]) -> None:
        """Capture these keys now (at worker start), the largest first: the pool then fits them all."""
        for key in sorted(keys, key=lambda k: (k.rows, k.context), reverse=True):
            self._graph(key)

    def run(self, table_keys: list[int], decodes: list[PagedDecode], token_ids: list[int]) -> torch.Tensor | None:
        """(N, hidden) final hidden states of a step of N decodes, or None when it cannot replay
        (no bucket, no free table row, the slots reallocated): the caller runs it eagerly.
        `table_keys`: what names each request's persistent table row (its slot)."""
        key = self.key_for([decode.position for decode in decodes])
        if key is None or self.pages.open_windows.pool.data.data_ptr() != self._slot_memory:
            return None
        replay = self._graph(key)  # first: a new key's capture fills its buffer with padding rows
        if replay is None:
            return None
        rows = self.tables.rows_for(table_keys, [decode.tables[0] for decode in decodes])
        if rows is None:
            return None
        inputs = self._inputs(key)
        inputs.fill(decodes, token_ids, rows)
        hidden = replay()
        inputs.finish(self.pages)
        return hidden[:len(decodes)]

    def release(self, table_key: int) -> None:
        """A request ended (or was rebuilt): its table row is reused."""
        self.tables.release(table_key)

    def static_bytes(self) -> int:
        """Device bytes of the static inputs: the persistent table and every key's input buffer."""
        return self.tables.table.nbytes + sum(inputs.device_buffer.nbytes for inputs in self.inputs.values())

    def _inputs(self, key: StaticDecodeKey) -> StaticDecodeInputs:
        if key not in self.inputs:
            self.inputs[key] = StaticDecodeInputs(key, self.shape, self.scratch, self.device)
        return self.inputs[key]

    def _forward(self, key: StaticDecodeKey) -> torch.Tensor:
        """The static step of `key` on whatever its input buffer holds -> (rows, hidden)."""
        return self.model.forward_decodes(StaticDecodeBatch(self.pages, self._inputs(key), self.tables.table))

    def _graph(self, key: StaticDecodeKey) -> Callable[[], torch.Tensor] | None:
        """The key's replay, recorded now if it is new; None once a capture has failed: then every
        decode step runs eagerly (a warning says why)."""
        if self.capture_error is not None:
            return None
        try:
            if key not in self.graphs:
                self.graphs[key] = self._record(key)
            return self.graphs[key]
        except Exception as error:  # noqa: BLE001 - a graph is an optimisation: eager is still exact
            self.capture_error = repr(error)
            LOG.warning("DeepSeek-V4 decode graph %s not captured; decode steps run eagerly: %r", key, error,
                        exc_info=True)  # the op that failed (CUDA_LAUNCH_BLOCKING=1 for a device assert)
            return None

    def _record(self, key: StaticDecodeKey) -> Callable[[], torch.Tensor]:
        """Warm the key's static step up and capture it, with padding rows only in its buffer (they
        write the scratch slot and blocks alone: a capture changes no request's state). The replay
        returns the graph's static output; on a CPU it runs the static step eagerly, so that the
        tests of the logic take the same path as a GPU."""
        self._inputs(key).fill([], [], [])
        with torch.inference_mode():
            for _ in range(WARM_UP_RUNS):
                self._forward(key)
            if self.device.type != "cuda":
                return lambda: self._forward(key)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(key)
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return output
        return replay
