"""The flash-style chunk attention kernel (model_shards/deepseek_v4/chunk_attention_kernel.py)
against `sink_attention`, the layers' path, in Triton's interpreter on a CPU (on a GPU when there
is one): window layers and HCA layers, with and without rows carried over, chunks starting at 0 and
mid-prompt, heads fewer than a dot's 16 rows and more than one block of them.

Tolerances: float32 inputs agree to float32 summation order (1e-5). bf16 inputs: both round each
logit to bf16 and run the softmax in float32; the kernel multiplies the keys by unnormalised
probabilities rounded to bf16 where the reference normalises first, so outputs differ by about
one bf16 rounding of a probability (2e-2 absolute on outputs of order 1, the bf16 tolerance of
the other V4 kernel tests). CSA's top-k and entries on pages (shuffled blocks) are read in place."""

from __future__ import annotations

import json

import pytest
import torch

from model_shards.deepseek_v4.chunk_attention_kernel import ChunkAttentionTiling, chunk_attention
from model_shards.deepseek_v4.entries import BlockRows, ContiguousEntries, PagedEntries
from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics
from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DIM, WINDOW, RATE = 16, 16, 4


def case(tokens: int, heads: int, carried: int, first: int, hca: bool, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    random = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE, dtype)  # noqa: E731
    q, window_keys = random(tokens, heads, DIM), random(carried + tokens, DIM)
    compressed = CompressedKeys(ContiguousEntries(random((first + tokens) // RATE, DIM)), None, first, RATE) \
        if hca else None
    sinks = torch.randn(heads, generator=generator).to(DEVICE)
    return q, window_keys, WINDOW, compressed, sinks, DIM ** -0.5


@pytest.mark.parametrize("tokens, heads, carried, first, hca", [
    (20, 2, 0, 0, False),  # a prompt's first chunk: windows still filling
    (23, 3, WINDOW - 1, 40, False),  # mid-prompt: every window full
    (37, 2, 0, 0, True),  # HCA from the start: entries close as the chunk goes
    (29, 4, WINDOW - 1, 64, True),  # HCA mid-prompt, a count that is no multiple of 16
    (9, 20, 5, 13, True),  # heads over two blocks of 16
])
@pytest.mark.parametrize("tiling", [ChunkAttentionTiling(), ChunkAttentionTiling(queries=2),
                                    ChunkAttentionTiling(queries=4, heads=16, keys=32)],
                         ids=["1 query", "2 queries", "4 queries"])  # chunks of 20, 23, 37, 29, 9: some programs short
def test_chunk_attention_equals_sink_attention_float32(tokens, heads, carried, first, hca, tiling):
    arguments = case(tokens, heads, carried, first, hca, torch.float32)
    torch.testing.assert_close(chunk_attention(*arguments, tiling=tiling), sink_attention(*arguments),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [16, 32])
def test_chunk_attention_equals_sink_attention_bf16(keys):
    arguments = case(41, 4, WINDOW - 1, 88, True, torch.bfloat16, seed=keys)
    with gpu_bf16_numerics():
        fused = chunk_attention(*arguments, tiling=ChunkAttentionTiling(keys=keys))
        reference = sink_attention(*arguments)
    torch.testing.assert_close(fused.float(), reference.float(), atol=2e-2, rtol=2e-2)


def on_pages(rows: torch.Tensor, rows_per_block: int = 8) -> PagedEntries:
    """The rows in shuffled blocks of a larger pool, as the engine keeps them."""
    pool = torch.zeros(12, rows_per_block, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:-(-rows.shape[0] // rows_per_block)]
    return PagedEntries(pool, BlockRows(table.to(rows.device), rows_per_block), 0).append(rows)


def csa(compressed: CompressedKeys, tokens: int, topk: int, seed: int) -> CompressedKeys:
    """Each query's top-k as the indexer leaves it: entries closed at its position, -1 padding."""
    generator = torch.Generator().manual_seed(seed)
    closed = (compressed.first_position + torch.arange(tokens) + 1) // compressed.rate  # (T,)
    ranks = torch.rand(tokens, compressed.entries.count, generator=generator).argsort(dim=1)[:, :topk]
    selected = torch.where(ranks < closed[:, None], ranks, -1)
    return CompressedKeys(compressed.entries, selected=selected.to(DEVICE))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layer", ["HCA", "CSA"])
def test_chunk_attention_reads_entries_on_pages_and_top_k(layer, paged):
    """CSA with a tiling of several queries a program runs them one a program (their keys differ)."""
    q, window_keys, window, compressed, sinks, scale = case(26, 3, 7, 36, True, torch.float32, seed=4)
    if paged:
        compressed = CompressedKeys(on_pages(compressed.entries.rows), None, compressed.first_position, RATE)
    if layer == "CSA":
        compressed = csa(compressed, q.shape[0], topk=5, seed=5)
    arguments = q, window_keys, window, compressed, sinks, scale
    fused = chunk_attention(*arguments, tiling=ChunkAttentionTiling(queries=4, heads=16))
    torch.testing.assert_close(fused, sink_attention(*arguments), atol=1e-5, rtol=1e-5)


def test_chunk_attention_refuses_entries_of_another_dtype():
    q, window_keys, window, compressed, sinks, scale = case(4, 2, 0, 0, True, torch.float32)
    half = CompressedKeys(ContiguousEntries(compressed.entries.rows.half()), None, 0, RATE)
    with pytest.raises(ValueError, match="entries in torch.float16"):
        chunk_attention(q, window_keys, window, half, sinks, scale)


def test_the_tiny_model_with_the_kernel_equals_the_transformers_full_forward(tmp_path, monkeypatch):
    """Every layer type of the tiny preset (window, CSA, HCA) with the fused core
    (model.deepseek_v4_chunk_attention): chunked prefill logits against transformers' full forward,
    float32 (1e-4, the tolerance of test_deepseek_v4.py's chunked prefill test); every chunk of
    every layer ran the kernel."""
    from transformers import DeepseekV4ForCausalLM as ReferenceModel

    from model_shards.deepseek_v4 import chunk_attention_kernel
    from model_shards.deepseek_v4.kernel_choices import KernelChoices
    from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
    from model_shards.deepseek_v4.presets import make_deepseek_v4_model

    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=0)
    ids = torch.randint(0, 1000, (90,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ReferenceModel.from_pretrained(folder).eval()(ids[None], use_cache=False).logits[0]
    calls = []
    monkeypatch.setattr(chunk_attention_kernel, "chunk_attention",
                        lambda *args: calls.append(1) or chunk_attention(*args))
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32, kernels=KernelChoices("fused"), device=DEVICE)
    state, on_device = model.new_state(), ids.to(DEVICE)  # the kernel runs where the model is (GPU or interpreter)
    logits = torch.cat([model.compute_logits(model(on_device[i:i + 32], state)) for i in range(0, len(ids), 32)])
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) == 3 * layers  # 3 chunks, every layer through the kernel
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-4, rtol=0)


def test_an_unknown_chunk_core_is_refused_by_name(tmp_path):
    from model_shards.deepseek_v4.chunk_cores import check_chunk_core

    with pytest.raises(ValueError, match="'flash' is not one of auto, blocks, fused"):
        check_chunk_core("flash")


@pytest.mark.parametrize("layer", ["window", "HCA", "CSA"])
def test_auto_runs_the_kernel_for_csa_layers_on_a_gpu_only(layer, monkeypatch):
    """`auto` (the default): the kernel where it measured faster (CSA, on a GPU); the layers' path
    for window and HCA layers, and everywhere without CUDA (never Triton's interpreter)."""
    from model_shards.deepseek_v4 import chunk_attention_kernel
    from model_shards.deepseek_v4.chunk_cores import attend_chunk

    q, window_keys, window, compressed, sinks, scale = case(12, 2, 3, 20, layer != "window", torch.float32)
    if layer == "CSA":
        compressed = csa(compressed, q.shape[0], topk=3, seed=2)
    calls = []
    monkeypatch.setattr(chunk_attention_kernel, "chunk_attention",
                        lambda *args: calls.append(1) or chunk_attention(*args))
    out = attend_chunk("auto", q, window_keys, window, compressed, sinks, scale)
    assert len(calls) == (layer == "CSA" and DEVICE.type == "cuda")
    torch.testing.assert_close(out, sink_attention(q, window_keys, window, compressed, sinks, scale),
                               atol=1e-5, rtol=1e-5)
