"""The attention core's fused softmax (model_shards/deepseek_v4/sink_softmax.py, in Triton's
interpreter on a CPU) against the torch form, through sink_attention's `attend_*`.

Groups as the model builds them: per-query window keys (t, W, D) with the sequence start masked,
then CSA's gathered keys (t, k, D) with empty selection slots, or HCA's shared entries (E, D) with
entries not yet closed masked; rows where the second group is wholly masked occur too. float32:
~1e-6 (summation order of the softmax); float16: one ulp of the probabilities.
"""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4 import sink_softmax
from model_shards.deepseek_v4.sink_attention import attend_fused, attend_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter without CUDA


def groups_for(kind: str, tokens: int, dtype: torch.dtype, generator: torch.Generator):
    window = torch.randn(tokens, 8, 32, generator=generator).to(dtype)
    window_allowed = torch.arange(8) + torch.arange(tokens)[:, None] >= 5  # the first queries lack rows
    if kind == "window":
        return [(window, window_allowed)]
    if kind == "csa":
        keys = torch.randn(tokens, 6, 32, generator=generator).to(dtype)
        return [(window, window_allowed), (keys, torch.rand(tokens, 6, generator=generator) > 0.3)]
    entries = torch.randn(300, 32, generator=generator).to(dtype)  # hca: more keys than one block
    visible = torch.arange(tokens) * 40 // tokens
    return [(window, window_allowed), (entries, torch.arange(300) < visible[:, None])]


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fused_softmax_attention_equals_torch(kind, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(11, 4, 32, generator=generator).to(dtype)
    sinks = torch.randn(4, generator=generator)
    groups = [(keys.to(DEVICE), allowed.to(DEVICE)) for keys, allowed in groups_for(kind, 11, dtype, generator)]
    q, sinks = q.to(DEVICE), sinks.to(DEVICE)
    expected = attend_torch(q, groups, sinks, 32 ** -0.5)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(attend_fused(q, groups, sinks, 32 ** -0.5), expected, atol=tolerance, rtol=tolerance)


def test_rows_longer_than_one_step_of_keys(monkeypatch):
    """HCA rows of 308 keys in steps of 64: the running max and sum across steps."""
    monkeypatch.setattr(sink_softmax, "BLOCK_KEYS", 64)
    test_fused_softmax_attention_equals_torch("hca", torch.float32, 1e-5)
