"""The flash-style chunk attention kernel (model_shards/deepseek_v4/chunk_attention_kernel.py)
against `sink_attention`, the layers' path, in Triton's interpreter on a CPU (on a GPU when there
is one): window layers and HCA layers, with and without rows carried over, chunks starting at 0 and
mid-prompt, heads fewer than a dot's 16 rows and more than one block of them.

Tolerances: float32 inputs agree to float32 summation order (1e-5). bf16 inputs: both round each
logit to bf16 and run the softmax in float32; the kernel multiplies the keys by unnormalised
probabilities rounded to bf16 where the reference normalises first, so outputs differ by about
one bf16 rounding of a probability (2e-2 absolute on outputs of order 1, the bf16 tolerance of
the other V4 kernel tests)."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.chunk_attention_kernel import ChunkAttentionTiling, chunk_attention
from model_shards.deepseek_v4.entries import ContiguousEntries
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
def test_chunk_attention_equals_sink_attention_float32(tokens, heads, carried, first, hca):
    arguments = case(tokens, heads, carried, first, hca, torch.float32)
    torch.testing.assert_close(chunk_attention(*arguments), sink_attention(*arguments), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [16, 32])
def test_chunk_attention_equals_sink_attention_bf16(keys):
    arguments = case(41, 4, WINDOW - 1, 88, True, torch.bfloat16, seed=keys)
    with gpu_bf16_numerics():
        fused = chunk_attention(*arguments, tiling=ChunkAttentionTiling(keys=keys))
        reference = sink_attention(*arguments)
    torch.testing.assert_close(fused.float(), reference.float(), atol=2e-2, rtol=2e-2)


def test_chunk_attention_refuses_csa():
    q, window_keys, window, compressed, sinks, scale = case(4, 2, 0, 0, True, torch.float32)
    selected = CompressedKeys(compressed.entries, selected=torch.zeros(4, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="CSA"):
        chunk_attention(q, window_keys, window, selected, sinks, scale)
