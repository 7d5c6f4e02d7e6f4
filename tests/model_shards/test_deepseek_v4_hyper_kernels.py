"""mHC's Triton kernels (model_shards/deepseek_v4/hyper_kernels.py, in Triton's interpreter on a
CPU) against the torch forms in hyper_connections.py, which equal transformers.

float32 streams: the kernels differ from torch by summation order and by where the RMS factor is
applied (after the product instead of before), ~1e-6 relative. A wrong stream, a transposed comb
or a missing Sinkhorn iteration moves values by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch

from model_folder.deepseek_v4_config import parse_deepseek_v4_config
from model_shards.deepseek_v4 import hyper_kernels
from model_shards.deepseek_v4.hyper_connections import HyperConnection, HyperHead, mix_streams_reference, \
    stream_mixes_torch
from model_shards.deepseek_v4.presets import preset_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter without CUDA
TOLERANCE = dict(atol=2e-5, rtol=2e-5)


def arch(hc: int):
    return parse_deepseek_v4_config(preset_config("deepseek-v4-tiny", hc_mult=hc, hidden_size=96))


def random_module(module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5
    module.scale.data = torch.rand(module.scale.shape, generator=generator) + 0.5
    return module.to(DEVICE)


def random_streams(tokens: int, hc: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, hc, 96, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("hc, tokens", [(4, 1), (4, 37), (2, 70)])
def test_fused_hyper_connection_equals_torch(hc, tokens):
    module, streams = random_module(HyperConnection(arch(hc))), random_streams(tokens, hc)
    for fused, reference in zip(module.fused(streams), module.reference(streams)):
        torch.testing.assert_close(fused, reference, **TOLERANCE)
    _, comb, _ = module.fused(streams)
    ones = torch.ones(tokens, hc, device=DEVICE)
    torch.testing.assert_close(comb.sum(dim=-2), ones, atol=1e-3, rtol=0)  # doubly
    torch.testing.assert_close(comb.sum(dim=-1), ones, atol=1e-3, rtol=0)  # stochastic


TILINGS = {
    "default": hyper_kernels.DEFAULT_MIXES_TILING,  # 128 rows, 8 splits, tf32x3
    "ieee": hyper_kernels.MixesTiling(),
    # hc 4 x hidden 96 = 384 columns over 4 splits: 3 of 128 columns (the last split's loop step
    # is masked past the width); hc 2: 2 splits of 128 and 64
    "split": hyper_kernels.MixesTiling(rows=64, splits=4, warps=8),
    "tf32x3": hyper_kernels.MixesTiling(rows=32, splits=2, precision="tf32x3"),
}


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
@pytest.mark.parametrize("hc, tokens", [(4, 1), (4, 70), (2, 37)])
def test_stream_mixes_kernel_equals_torch(hc, tokens, tiling):
    """The kernel the layers use from FUSED_MIXES_MIN_TOKENS tokens on (cuBLAS below), in each
    tiling bench/deepseek_v4_mhc.py compares. tf32x3 keeps ~float32 accuracy on a GPU (three TF32
    products; the interpreter computes it in float32)."""
    module, streams = random_module(HyperConnection(arch(hc))), random_streams(tokens, hc)
    torch.testing.assert_close(hyper_kernels.stream_mixes(streams, module.fn, 1e-6, TILINGS[tiling]),
                               stream_mixes_torch(streams, module.fn, 1e-6), **TOLERANCE)


def test_fused_hyper_head_equals_torch():
    module, streams = random_module(HyperHead(arch(4)), seed=2), random_streams(19, 4)
    torch.testing.assert_close(module.fused(streams), module.reference(streams), **TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_mix_equals_torch(dtype):
    generator = torch.Generator().manual_seed(3)
    streams, output = random_streams(23, 4).to(dtype), torch.randn(23, 96, generator=generator).to(dtype)
    output = output.to(DEVICE)
    post, comb = (torch.rand(23, 4, generator=generator) * 2).to(DEVICE), torch.rand(23, 4, 4, generator=generator).to(DEVICE)
    expected = mix_streams_reference(streams.float(), output.float(), post, comb)
    tolerance = TOLERANCE if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(hyper_kernels.mix(streams, output, post, comb).float(), expected, **tolerance)
