"""The GPU backend's logic against the reference backend, on the CPU.

The prefill pieces (chunked_prefill.py) are checked for exact coverage and for the bounded set of
shapes the planned kernel sees; the whole backend (Triton decode in the interpreter, the
reference LSE kernel in place of cuDNN) against TorchSDPABackend on mixed batches.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from model_shards.attention.base import AttentionMetadata  # noqa: E402
from model_shards.attention.chunked_prefill import (PLANNED_MIN_QUERIES, PLANNED_MIN_STEP,  # noqa: E402
                                                    PrefillKernels, bucket_tokens, chunk_attention,
                                                    prefix_pieces, warm_shapes)
from model_shards.attention.cudnn_triton import CudnnTritonBackend, canonical_device, warm_up_merges  # noqa: E402
from model_shards.attention.torch_sdpa import TorchSDPABackend  # noqa: E402
from model_shards.parallel.lse_attention import PartialSum, reference_attention  # noqa: E402


@given(st.integers(1, 1 << 20))
def test_query_buckets_pad_at_most_a_quarter(count):
    bucket = bucket_tokens(count)
    assert bucket >= max(count, 128)
    assert count <= 128 or bucket <= count * 1.25


def test_query_buckets_are_few():
    assert len({bucket_tokens(n) for n in range(1, 16385)}) == 1 + 4 * 7  # 128, then 4 per octave
    assert [bucket_tokens(n) for n in (129, 8189, 8192, 8193)] == [160, 8192, 8192, 10240]


@settings(max_examples=300)
@given(st.integers(0, 1 << 21), st.sampled_from([64, 1024, 4096]))
def test_prefix_pieces_cover_the_prefix_with_few_shapes(prefix_len, quantum):
    pieces = prefix_pieces(prefix_len, quantum)
    assert sum(length for _, length in pieces) == prefix_len
    assert all(start == sum(length for _, length in pieces[:i]) for i, (start, _) in enumerate(pieces))
    aligned = [length for _, length in pieces if length % quantum == 0]
    assert all(length // quantum & (length // quantum - 1) == 0 for length in aligned)  # powers of two
    assert aligned == sorted(set(aligned), reverse=True)  # each size once, largest first
    rest = [length for _, length in pieces if length % quantum]
    assert len(rest) <= 1 and all(length < quantum for length in rest)
    assert not rest or pieces[-1][1] == rest[0]


class RecordingKernel:
    """The reference LSE kernel, remembering each (queries, keys, causal) shape it was given."""

    def __init__(self):
        self.shapes = []

    def __call__(self, q, k, v, scale, causal):
        self.shapes.append((q.shape[0], k.shape[0], causal))
        return reference_attention(q, k, v, scale, causal)


def paged_cache(num_blocks, block_size, kv_heads, head_dim, generator):
    return torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=generator)[:, 0]


def chunk_case(prefix_len, count, seed):
    """(query, key, value, cache, block_ids) of one chunk over a shuffled paged cache, and the
    whole context's keys and values."""
    generator = torch.Generator().manual_seed(seed)
    block_size, heads, kv_heads, head_dim = 16, 4, 2, 32
    cache = paged_cache(64, block_size, kv_heads, head_dim, generator)
    block_ids = torch.randperm(64, generator=generator)[:-(-(prefix_len + count) // block_size)]
    query = torch.randn(count, heads, head_dim, generator=generator)
    key, value = (torch.randn(count, kv_heads, head_dim, generator=generator) for _ in range(2))
    context_keys = torch.cat([cache[block_ids, 0].flatten(0, 1)[:prefix_len], key])
    context_values = torch.cat([cache[block_ids, 1].flatten(0, 1)[:prefix_len], value])
    return (query, key, value, cache, block_ids), context_keys, context_values


CHUNKS = [(0, 50), (96, 40), (5 * 32 + 7, 33), (7 * 32, 128), (3 * 32, 160)]


@pytest.mark.parametrize("prefix_len, count", CHUNKS)
def test_a_chunk_without_plans_runs_unpadded_on_the_plan_free_kernel(prefix_len, count):
    inputs, context_keys, context_values = chunk_case(prefix_len, count, prefix_len + count)
    planned, unplanned = RecordingKernel(), RecordingKernel()
    out = chunk_attention(*inputs, prefix_len, 0.2, PrefillKernels(planned, unplanned, quantum=32))
    expected, _ = reference_attention(inputs[0], context_keys, context_values, 0.2, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert planned.shapes == []
    assert unplanned.shapes == [(count, count, True)] + [(count, length, False)
                                                         for _, length in prefix_pieces(prefix_len, 32)]


@pytest.mark.parametrize("prefix_len, count", CHUNKS)
def test_planned_shapes_run_padded_on_the_planned_kernel_and_the_rest_unpadded(prefix_len, count):
    inputs, context_keys, context_values = chunk_case(prefix_len, count, prefix_len + count)
    bucket = bucket_tokens(count)
    warm = {(bucket, bucket, True), (bucket, 32, False), (bucket, 128, False)}
    planned, unplanned = RecordingKernel(), RecordingKernel()
    kernels = PrefillKernels(planned, unplanned, quantum=32)
    for shape in warm:
        kernels.mark_planned(shape)
    out = chunk_attention(*inputs, prefix_len, 0.2, kernels)
    expected, _ = reference_attention(inputs[0], context_keys, context_values, 0.2, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    pieces = [(bucket, length, False) for _, length in prefix_pieces(prefix_len, 32)]
    assert planned.shapes == [(bucket, bucket, True)] + [shape for shape in pieces if shape in warm]
    assert unplanned.shapes == [(count, keys, False) for _, keys, _ in pieces if (bucket, keys, False) not in warm]


@pytest.mark.parametrize("prefix_len, count", CHUNKS)
def test_without_a_plan_free_kernel_every_shape_is_padded_to_its_bucket(prefix_len, count):
    inputs, context_keys, context_values = chunk_case(prefix_len, count, prefix_len + count)
    only = RecordingKernel()
    out = chunk_attention(*inputs, prefix_len, 0.2, PrefillKernels(only, only, quantum=32))
    expected, _ = reference_attention(inputs[0], context_keys, context_values, 0.2, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    bucket = bucket_tokens(count)
    pieces = prefix_pieces(prefix_len, 32)
    assert only.shapes == [(bucket, bucket, True)] + [(bucket if keys % 32 == 0 else count, keys, False)
                                                      for _, keys in pieces]  # the rest < 32 keys: unpadded


def test_shapes_planned_in_another_thread_do_not_count_here():
    kernels = PrefillKernels(RecordingKernel(), RecordingKernel(), quantum=32)
    elsewhere = threading.Thread(target=kernels.mark_planned, args=((128, 128, True),))
    elsewhere.start()
    elsewhere.join()
    assert not kernels.uses_plan((128, 128, True))
    kernels.mark_planned((128, 128, True))
    assert kernels.uses_plan((128, 128, True)) and kernels.planned_here() == {(128, 128, True)}


def test_a_device_without_index_finds_the_kernels_of_its_tensors(monkeypatch):
    """The worker warms up with the config's device (`cuda`); steps look kernels up by their
    tensors' device (`cuda:0`). Session 5's H200 run missed every warmed plan this way."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device(torch.device("cuda")) == canonical_device(torch.device("cuda:0")) == torch.device("cuda", 0)
    assert canonical_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert canonical_device(torch.device("cpu")) == torch.device("cpu")


def test_warm_shapes_cover_every_chunk_of_a_lone_prompt_but_its_last():
    shapes = warm_shapes(16384, 1 << 20, 1024)
    assert [shape for shape in shapes if shape[2]] == [(16384, 16384, True)]
    assert [keys for _, keys, causal in shapes if not causal] == [1024 << i for i in range(10)]
    assert all(queries == 16384 for queries, _, causal in shapes if not causal)
    assert warm_shapes(2048, 1 << 20, 1024) == []  # steps below PLANNED_MIN_STEP never plan
    assert warm_shapes(PLANNED_MIN_STEP, 4096, 1024) == [(4096, 4096, True), (4096, 1024, False),
                                                         (4096, 2048, False)]
    big = [queries for queries, _, causal in warm_shapes(40000, 1 << 16, 1024) if causal]
    assert big == [PLANNED_MIN_QUERIES, 20480, 24576, 28672, 32768, 40960]  # every bucket up to the step's


@pytest.mark.parametrize("tokens", [40_000, 130_000, 1_000_000])
def test_a_lone_prompt_plans_only_warm_shapes_before_its_last_chunk(tokens):
    """Chunks of a prompt alone under the default budget: every piece of every chunk but the last
    is a warm shape (no plan is built inside the request)."""
    step, quantum = 16384, 1024
    warm = set(warm_shapes(step, tokens, quantum))
    for start in range(0, tokens - step, step):
        bucket = bucket_tokens(step)
        assert (bucket, bucket, True) in warm
        assert all((bucket, length, False) in warm for _, length in prefix_pieces(start, quantum))


def build_step(generator, block_size, sequences):
    """sequences: (computed, new) per sequence -> block tables over a shuffled pool, metadata."""
    pool = torch.randperm(200, generator=generator).tolist()
    tables = []
    for computed, new in sequences:
        blocks = -(-(computed + new) // block_size) + 1  # one block allocated ahead
        tables.append([pool.pop() for _ in range(blocks)])
    metadata = AttentionMetadata.build([(t, c, n) for t, (c, n) in zip(tables, sequences)], block_size, "cpu")
    return metadata


@pytest.mark.parametrize("sequences", [
    [(40, 1), (95, 1), (0, 1)],  # decodes only (a one-token prompt too)
    [(10, 1), (300, 1), (0, 70)],  # decodes, then a new prompt
    [(33, 1), (64, 64), (130, 45), (0, 1)],  # decodes, two chunks with cached prefixes, a late one-token prompt
    [(0, 20), (17, 1)],  # a chunk first: the decode after it goes the prefill way
])
def test_backend_matches_reference_on_mixed_steps(sequences):
    generator = torch.Generator().manual_seed(len(sequences) * 31 + sequences[-1][1])
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 32
    cache = paged_cache(200, block_size, kv_heads, head_dim, generator)
    expected_cache = cache.clone()
    metadata = build_step(generator, block_size, sequences)
    tokens = metadata.num_tokens
    query = torch.randn(tokens, heads, head_dim, generator=generator)
    key, value = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
    out = CudnnTritonBackend().forward(query, key, value, cache, metadata, 0.17)
    expected = TorchSDPABackend().forward(query, key, value, expected_cache, metadata, 0.17)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    assert torch.equal(cache, expected_cache)  # the same K/V written to the same slots


def test_leading_one_token_sequences_are_the_decodes():
    metadata = build_step(torch.Generator().manual_seed(0), 16, [(5, 1), (9, 1), (0, 7), (3, 1)])
    assert metadata.num_decode_seqs == 2
    assert metadata.seq_lens_tensor.tolist() == [6, 10, 7, 4]
    assert metadata.seq_lens_tensor.dtype == torch.int32


def test_engine_greedy_tokens_equal_the_reference_backend(model_folder):
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    prompts = [[random.Random(i).randrange(3, 500) for _ in range(n)] for i, n in enumerate((70, 9, 33))]
    folder = str(model_folder(num_key_value_heads=2))  # GQA 4
    results = {}
    for backend in ("torch_sdpa", "cudnn_triton"):
        config = LongctxConfig(model=ModelSettings(path=folder, attention_backend=backend),
                               cache=CacheSettings(block_size=16, num_device_blocks=64),
                               scheduler=SchedulerSettings(max_tokens_per_step=48))  # chunked prompts
        engine = LLMEngine(config)
        outputs = generate(engine, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
        results[backend] = [output[0].token_ids for output in outputs]
        engine.shutdown()
    assert results["cudnn_triton"] == results["torch_sdpa"]


def test_eager_steps_launch_one_decode_variant_whatever_their_table_width():
    """A step's block table is as wide as its longest sequence; rows padded to a multiple of 16
    keep the paged decode kernel's specialization (its row stride: 1, a multiple of 16 or
    neither) one, so no step compiles a second variant inside a request."""
    from model_shards.attention.triton_paged_decode import _paged_decode_partials
    from model_shards.triton_compiles import LaunchKeys

    generator = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim = 4, 2, 16
    cache = paged_cache(200, 16, kv_heads, head_dim, generator)
    with LaunchKeys(_paged_decode_partials) as launches:
        for sequences in ([(5, 1), (0, 3)], [(40, 1), (0, 30)], [(250, 1), (9, 1)], [(15, 1)]):  # 1 to 17 blocks
            metadata = build_step(generator, 16, sequences)
            tokens = metadata.num_tokens
            query = torch.randn(tokens, heads, head_dim, generator=generator)
            key, value = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
            CudnnTritonBackend().forward(query, key, value, cache, metadata, 0.25)
            assert metadata.block_table_tensor.shape[1] % 16 == 0
    assert len(launches.keys[_paged_decode_partials]) == 4
    assert len(set(launches.keys[_paged_decode_partials])) == 1


def test_the_merge_warm_up_runs_a_planned_and_an_unplanned_chunk_over_a_prefix(monkeypatch):
    """warm_up_merges: the kernels a chunk over a cached prefix launches, PartialSum's merge
    among them, run at start-up at the step budget's bucket (planned) and the smallest (not)."""
    planned, unplanned = RecordingKernel(), RecordingKernel()
    kernels = PrefillKernels(planned, unplanned, quantum=32)
    kernels.mark_planned((256, 256, True))
    kernels.mark_planned((256, 32, False))
    merged_rows, merge = [], PartialSum._merge

    def recording_merge(self, start, out, lse):
        merged_rows.append(out.shape[0])
        merge(self, start, out, lse)

    monkeypatch.setattr(PartialSum, "_merge", recording_merge)
    warm_up_merges(kernels, torch.device("cpu"), torch.float32, 4, 2, 32, 16, step_tokens=250)
    assert unplanned.shapes == [(128, 128, True), (128, 32, False)]
    assert planned.shapes == [(256, 256, True), (256, 32, False)]
    assert merged_rows == [128, 256]
