"""cuDNN plans built at start-up on the GPU: the warm shapes run on cuDNN, others on
FlashAttention-2 unpadded, both equal to float32 attention over the whole context."""

from __future__ import annotations

import threading

import pytest
import torch

from model_shards.attention.chunked_prefill import bucket_tokens, chunk_attention, warm_shapes
from model_shards.attention.cudnn_triton import CudnnTritonBackend
from model_shards.parallel.lse_attention import reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 64


class Recording:
    def __init__(self, kernel):
        self.kernel, self.shapes = kernel, []

    def __call__(self, q, k, v, scale, causal):
        self.shapes.append((q.shape[0], k.shape[0], causal))
        return self.kernel(q, k, v, scale, causal)


@pytest.fixture(scope="module")
def warm_kernels():
    device = torch.device("cuda")
    backend = CudnnTritonBackend()
    built = backend.warm_up(device, torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, BLOCK, 4096, 8192)
    kernels = backend._kernels_for(device, torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    assert built == len(warm_shapes(4096, 8192, kernels.quantum)) == 4
    kernels.planned, kernels.unplanned = Recording(kernels.planned), Recording(kernels.unplanned)
    return kernels


def test_another_thread_plans_again(warm_kernels):
    """cuDNN's plan cache is per thread: a thread that steps the worker warms itself."""
    backend, built = CudnnTritonBackend(), []
    args = (torch.device("cuda"), torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, BLOCK, 4096, 8192)
    assert backend.warm_up(*args) == 4 and backend.warm_up(*args) == 0
    other = threading.Thread(target=lambda: built.append(backend.warm_up(*args)))
    other.start()
    other.join()
    assert built == [4]


def test_the_backend_finds_plans_warmed_for_a_device_without_index():
    """Warm-up with the config's `cuda`, a step with tensors on `cuda:0`: the chunk runs on cuDNN."""
    backend = CudnnTritonBackend()
    backend.warm_up(torch.device("cuda"), torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, BLOCK, 4096, 8192)
    kernels = backend._kernels_for(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, HEADS,
                                   KV_HEADS, HEAD_DIM, BLOCK)
    assert kernels.planned_here() == set(warm_shapes(4096, 8192, kernels.quantum))


@pytest.mark.parametrize("prefix_len, count, planned", [
    (4096, 4000, [(4096, 4096, True), (4096, 4096, False)]),  # a full chunk's shapes: all warm
    (5000, 3000, []),  # a last chunk: its bucket (3072) was never planned
])
def test_warm_shapes_use_cudnn_and_the_others_flash(warm_kernels, prefix_len, count, planned):
    generator = torch.Generator(device="cuda").manual_seed(count)
    blocks = -(-(prefix_len + count) // BLOCK)
    cache = torch.randn(blocks, 2, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
    block_ids = torch.randperm(blocks, device="cuda", generator=generator)
    query = torch.randn(count, HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
    key, value = (torch.randn(count, KV_HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
                  for _ in range(2))
    warm_kernels.planned.shapes.clear()
    out = chunk_attention(query, key, value, cache, block_ids, prefix_len, HEAD_DIM ** -0.5, warm_kernels)
    context_keys = torch.cat([cache[block_ids, 0].flatten(0, 1)[:prefix_len], key]).float()
    context_values = torch.cat([cache[block_ids, 1].flatten(0, 1)[:prefix_len], value]).float()
    expected, _ = reference_attention(query.float(), context_keys, context_values, HEAD_DIM ** -0.5, causal=True)
    assert (out.float() - expected).abs().max() < 2e-2  # bf16 output: a few ulps of values ~O(0.1)
    assert warm_kernels.planned.shapes == planned
    assert bucket_tokens(count) == (4096 if planned else 3072)


def test_short_chunks_beside_decodes_attend_in_one_varlen_call():
    """Prompts joining a decoding batch (a 4K cached prefix + 256 new tokens each, odd lengths too):
    FlashAttention-2's varlen call, picked by the start-up probe, against float32 per sequence."""
    from model_shards.attention.base import AttentionMetadata
    from model_shards.attention.varlen_prefill import flash_varlen

    generator = torch.Generator(device="cuda").manual_seed(3)
    sequences, next_block = [], 0
    for computed, new in [(900, 1), (4096, 256), (4096, 256), (3001, 77), (0, 300)]:
        blocks = -(-(computed + new) // BLOCK)
        sequences.append((list(range(next_block, next_block + blocks)), computed, new))
        next_block += blocks
    cache = torch.randn(next_block, 2, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
    metadata = AttentionMetadata.build(sequences, BLOCK, "cuda")
    tokens = metadata.num_tokens
    query = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
    key, value = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", generator=generator).bfloat16()
                  for _ in range(2))
    backend = CudnnTritonBackend()
    assert backend._prefill_kernels(query, cache).varlen is flash_varlen
    out = backend.forward(query, key, value, cache, metadata, HEAD_DIM ** -0.5)
    assert [(g.first_seq, g.end_seq) for g in backend._step_groups[1]] == [(1, 5)]
    for index, (table, computed, new) in enumerate(sequences):
        start = metadata.query_start_loc[index]
        context = cache[torch.tensor(table, device="cuda")]  # (blocks, 2, BLOCK, KV, D); new K/V written first
        keys, values = (context[:, side].flatten(0, 1)[:computed + new].float() for side in (0, 1))
        expected, _ = reference_attention(query[start:start + new].float(), keys, values, HEAD_DIM ** -0.5, True)
        assert (out[start:start + new].float() - expected).abs().max() < 2e-2, index  # bf16 output, values ~O(0.1)
