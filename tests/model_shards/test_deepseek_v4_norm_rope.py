"""The fused RMS norm + interleaved RoPE kernel (model_shards/deepseek_v4/norm_rope.py, in
Triton's interpreter on a CPU) against the torch forms the attention layer used before.

float32: equal up to rsqrt's last bit (1e-6). float16: the kernel rounds where torch rounds (the
norm's output, then the rotation), so results agree to one half-precision ulp.
"""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.norm_rope import norm_and_rotate_torch, norm_and_rotate_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter without CUDA


def inputs(shape: tuple[int, ...], half: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    angles = torch.rand(shape[0], half, generator=generator) * 6
    weight = torch.rand(shape[-1], generator=generator) + 0.5
    return x.to(DEVICE), angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype), weight.to(DEVICE)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("norm", ["none", "unweighted", "weighted"])
@pytest.mark.parametrize("shape, half", [((5, 4, 64), 8), ((9, 48), 12), ((3, 2, 32), 16)])
def test_fused_norm_and_rope_equal_torch(dtype, tolerance, norm, shape, half):
    """q-like (tokens, heads, dim) and kv-like (tokens, dim) rows, a rope part smaller than,
    not a power of two of, and equal to the row."""
    x, cos, sin, weight = inputs(shape, half, dtype)
    expected = norm_and_rotate_torch(x, cos, sin, norm, 1e-6, weight)
    fused = norm_and_rotate_triton(x.clone(), cos, sin, norm, 1e-6, weight)
    assert (expected - x).abs().max() > 0.1
    torch.testing.assert_close(fused.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_unrotating_restores_the_input():
    x, cos, sin, _ = inputs((6, 4, 64), 8, torch.float32, seed=1)
    rotated = norm_and_rotate_triton(x.clone(), cos, sin, "none")
    torch.testing.assert_close(norm_and_rotate_triton(rotated, cos, -sin, "none"), x, atol=1e-5, rtol=1e-5)
