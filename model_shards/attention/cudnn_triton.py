"""The GPU attention backend: decode rows through the Triton paged kernel, prefill chunks
through cuDNN on the bucketed shapes planned at start-up (`warm_up`), FlashAttention-2 on any
other shape (chunked_prefill.py). One step may mix both.

The scheduler puts decoding sequences first in a step, so the leading sequences with one new
token form one launch of the paged decode kernel (triton_paged_decode.py), whatever their number.
Each remaining sequence is a prefill chunk. Short chunks (prompts joining a decoding batch) attend
together, in one varlen call per group (varlen_prefill.py); a chunk on cuDNN's planned shapes (a
long prompt's) or a lone one takes its own call. New K/V go into the cache first, in one kernel
(triton_store_kv.py).
"""

from __future__ import annotations

import torch

from model_shards.attention.base import TABLE_WIDTH_MULTIPLE, AttentionBackend, AttentionMetadata
from model_shards.attention.chunked_prefill import (
    MIN_QUERY_BUCKET,
    PrefillKernels,
    bucket_tokens,
    chunk_attention,
    warm_shapes,
)
from model_shards.attention.triton_paged_decode import paged_decode
from model_shards.attention.triton_store_kv import store_kv
from model_shards.attention.varlen_prefill import PrefillGroup, VarlenKernel, group_attention, plan_groups, \
    select_varlen_kernel
from model_shards.parallel.lse_attention import PREFILL_PREFERENCE, reference_attention, select_kernel

# Prefix pieces are power-of-two multiples of this many tokens (at least the block size): few
# enough shapes for cuDNN's plan cache, large enough that each piece runs at full rate.
PREFIX_QUANTUM_TOKENS = 1024
_UNPLANNED_PREFERENCE = ("flash", "flash_expanded")
_CPU_SMS = 4  # the interpreter runs programs one by one: few of them keep CPU tests quick


def canonical_device(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current>`: a tensor's device always has its index, a config's may not, and
    both must find the same kernels (and the plans warmed for them)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class CudnnTritonBackend(AttentionBackend):
    graph_safe_decode = True

    def __init__(self, varlen_kernel: VarlenKernel | None = None) -> None:
        """varlen_kernel: the grouped chunks' kernel for every head shape (tests: the reference);
        default: FlashAttention-2's where a probe of the head shape passes, else none."""
        self._kernels: dict[tuple, PrefillKernels] = {}  # per (device, dtype, heads, kv_heads, head_dim)
        self._num_sms: dict[torch.device, int] = {}
        self._varlen_kernel = varlen_kernel
        self._step_groups: tuple[AttentionMetadata | None, list[PrefillGroup]] = (None, [])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(layer_cache, key, value, metadata.slot_mapping)
        out = torch.empty_like(query)  # (T, heads, head_dim)
        num_decodes = metadata.num_decode_seqs
        if num_decodes:
            out[:num_decodes] = self.decode(query[:num_decodes], layer_cache, metadata, scale)
        if num_decodes < metadata.num_seqs:
            kernels = self._prefill_kernels(query, layer_cache)
            grouped = set()
            for group in self._groups(metadata, kernels):
                out[group.first_row:group.end_row] = group_attention(query, layer_cache, group, scale, kernels.varlen)
                grouped.update(range(group.first_seq, group.end_seq))
            for i in range(num_decodes, metadata.num_seqs):
                if i not in grouped:
                    self._prefill(i, query, key, value, layer_cache, metadata, scale, kernels, out)
        return out

    def _groups(self, metadata: AttentionMetadata, kernels: PrefillKernels) -> list[PrefillGroup]:
        """The step's groups of chunks without a planned piece, planned at its first layer (the
        metadata is the step's: every layer of the step gets the same object)."""
        if kernels.varlen is None:
            return []
        if self._step_groups[0] is not metadata:
            starts, context_lens = metadata.query_start_loc, metadata.context_lens
            eligible = [i for i in range(metadata.num_decode_seqs, metadata.num_seqs)
                        if not kernels.plans_a_piece_of(starts[i + 1] - starts[i],
                                                        context_lens[i] - (starts[i + 1] - starts[i]))]
            self._step_groups = (metadata, plan_groups(metadata, eligible))
        return self._step_groups[1]

    def decode(self, query: torch.Tensor, layer_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """The first len(query) sequences of the step, one token each."""
        count = query.shape[0]  # a CUDA graph's context_lens are max_model_len: more slots, same bits
        return paged_decode(query, layer_cache, metadata.block_table_tensor[:count], metadata.seq_lens_tensor[:count],
                            scale, max(metadata.context_lens[:count]), num_sms=self.num_sms(query.device))

    def _prefill(self, index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                 kernels: PrefillKernels, out: torch.Tensor) -> None:
        start, end = metadata.query_start_loc[index], metadata.query_start_loc[index + 1]
        prefix_len = metadata.context_lens[index] - (end - start)
        block_ids = metadata.block_table_tensor[index, :metadata.num_blocks_of(index)]
        out[start:end] = chunk_attention(query[start:end], key[start:end], value[start:end], layer_cache,
                                         block_ids, prefix_len, scale, kernels)

    def num_sms(self, device: torch.device) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                     if device.type == "cuda" else _CPU_SMS)
        return self._num_sms[device]

    def warm_up(self, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                block_size: int, step_tokens: int, max_model_len: int) -> int:
        """Build the planned kernel's plans for chunked_prefill.warm_shapes in this thread (11 on
        the default config at 1M tokens, ~1-2 s), so that no request builds one; returns how many
        were built now (0 when this thread has them all)."""
        kernels = self._kernels_for(device, dtype, heads, kv_heads, head_dim, block_size)
        if device.type == "cuda":
            self._warm_up_eager_decode(device, dtype, heads, kv_heads, head_dim, block_size)
        missing = []
        if kernels.planned is not reference_attention:  # reference: a dtype the fused kernels do not take
            missing = [shape for shape in warm_shapes(step_tokens, max_model_len, kernels.quantum)
                       if shape not in kernels.planned_here()]
        for queries, keys, causal in missing:
            q = torch.zeros(queries, heads, head_dim, device=device, dtype=dtype)  # (n, H, D)
            k, v = (torch.zeros(keys, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
            kernels.planned(q, k, v, head_dim ** -0.5, causal)
            kernels.mark_planned((queries, keys, causal))
        if device.type == "cuda":
            warm_up_merges(kernels, device, dtype, heads, kv_heads, head_dim, block_size, step_tokens)
            torch.cuda.synchronize(device)
        return len(missing)

    def _warm_up_eager_decode(self, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                              head_dim: int, block_size: int) -> None:
        """Compile the paged decode kernel's variant for eager steps here: their block table is
        int64 (a CUDA graph's is int32), so the first step that mixes decodes with a prompt
        compiled it inside a request (0.44 s on an H100, session 15's serve bench). Every stride
        of the dummies is a multiple of 16, as the real ones are (model_shards/kv_cache.py)."""
        cache = torch.zeros(1, 2, block_size, kv_heads, head_dim, device=device, dtype=dtype)
        table = torch.zeros(1, TABLE_WIDTH_MULTIPLE, dtype=torch.long, device=device)
        query = torch.zeros(1, heads, head_dim, device=device, dtype=dtype)
        paged_decode(query, cache, table, torch.ones(1, dtype=torch.int32, device=device), 1.0, 1,
                     num_sms=self.num_sms(device))

    def _prefill_kernels(self, query: torch.Tensor, layer_cache: torch.Tensor) -> PrefillKernels:
        return self._kernels_for(query.device, query.dtype, query.shape[1], layer_cache.shape[3], query.shape[2],
                                 layer_cache.shape[2])

    def _kernels_for(self, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                     block_size: int) -> PrefillKernels:
        key = (canonical_device(device), dtype, heads, kv_heads, head_dim)
        if key not in self._kernels:
            planned_name, planned = select_kernel(*key, preference=PREFILL_PREFERENCE)
            unplanned_name, unplanned = select_kernel(*key, preference=_UNPLANNED_PREFERENCE)
            if unplanned_name == "reference" and planned_name != "reference":
                unplanned = planned  # a new plan for the odd shape beats materialising its scores
            quantum = max(PREFIX_QUANTUM_TOKENS, block_size)
            varlen = self._varlen_kernel or select_varlen_kernel(*key)
            self._kernels[key] = PrefillKernels(planned, unplanned, quantum, varlen)
        return self._kernels[key]


def warm_up_merges(kernels: PrefillKernels, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                   head_dim: int, block_size: int, step_tokens: int) -> None:
    """A chunk over a cached prefix, at the step budget's bucket (planned pieces) and at the
    smallest (unplanned), so that the kernels merging its partials (PartialSum: logaddexp, where,
    a mixed-dtype addcmul_) load here. CUDA loads a kernel at its first launch: the first prompt
    long enough for two chunks loaded these inside its request (an H100 profile of a 32.5K-token
    prompt, session 16: logaddexp 40 ms, addcmul_ 14 ms, where 12 ms of host time; TTFT 0.120 s
    against 0.093 s for the next such prompt)."""
    prefix = kernels.quantum  # one prefix piece, planned at every budget's bucket (warm_shapes)
    cache = torch.zeros(-(-prefix // block_size), 2, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    block_ids = torch.arange(cache.shape[0], device=device)  # (blocks,)
    counts = {MIN_QUERY_BUCKET}
    if kernels.planned is not reference_attention:  # the reference would materialise the budget's scores
        counts.add(bucket_tokens(step_tokens))
    for count in sorted(counts):
        query = torch.zeros(count, heads, head_dim, device=device, dtype=dtype)  # (n, H, D)
        key, value = (torch.zeros(count, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        chunk_attention(query, key, value, cache, block_ids, prefix, head_dim ** -0.5, kernels)
