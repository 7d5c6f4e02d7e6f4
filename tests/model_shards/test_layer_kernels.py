"""The fused layer kernels (model_shards/layer_kernels.py; Triton's interpreter on a CPU) against
the torch forms transformers' Llama layer computes.

The kernels round to the activations' dtype where each torch op rounds, so RoPE and SiLU-and-
multiply agree to the bit in float32 and to one ulp of the dtype where a float32 exp or product
lands on a rounding boundary; the norm's float32 sum runs in another order, so its factor may
differ in the last float32 bit: again one ulp of the output at most.
"""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics
from model_shards.layer_kernels import (
    add_rms_norm,
    add_rms_norm_torch,
    add_rms_norm_triton,
    fused_kernels_run,
    rotate_queries_and_keys_torch,
    rotate_queries_and_keys_triton,
    silu_and_mul_torch,
    silu_and_mul_triton,
)
from model_shards.triton_compiles import LaunchKeys

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter without CUDA
# One ulp of the dtype at the values' scale (|x| < 8 here): bf16 keeps 8 bits of mantissa.
ULPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8 * 8, torch.float16: 2 ** -11 * 8}


@pytest.fixture(autouse=True)
def bf16_rounded_as_on_a_gpu():
    """The interpreter truncates a float32 -> bf16 cast; the GPU (and torch) round to nearest."""
    with gpu_bf16_numerics():
        yield


def randn(*shape: int, seed: int, dtype: torch.dtype, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)


def assert_within_an_ulp(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    difference = (actual.float() - expected.float()).abs()
    assert difference.max() <= ULPS[dtype] * expected.float().abs().clamp(min=1).max()
    if dtype != torch.float32:  # a last-bit difference in float32 rarely survives the rounding
        assert (difference == 0).float().mean() > 0.99  # nearly every element to the bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, hidden", [(1, 64), (7, 96), (33, 2048), (3, 4096)])
def test_add_rms_norm_equals_the_residual_add_and_norm(dtype, tokens, hidden):
    """Widths a power of two and not, one row a program (2K channels up) and several."""
    residual, delta = randn(tokens, hidden, seed=0, dtype=dtype), randn(tokens, hidden, seed=1, dtype=dtype)
    weight = (randn(hidden, seed=2, dtype=torch.float32, scale=0.3) + 1).to(dtype)
    expected_sum, expected_norm = add_rms_norm_torch(residual, delta, weight, 1e-5)
    summed, normed = add_rms_norm_triton(residual, delta, weight, 1e-5)
    assert torch.equal(summed, expected_sum)  # one rounded add, as torch's
    assert_within_an_ulp(normed, expected_norm, dtype)
    first, normed_alone = add_rms_norm_triton(residual, None, weight, 1e-5)  # the first layer: no delta
    assert first is residual
    assert_within_an_ulp(normed_alone, add_rms_norm_torch(residual, None, weight, 1e-5)[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (6, 1, 32), (3, 3, 128), (5, 5, 80)])
def test_rotating_queries_and_keys_equals_apply_rotary(dtype, heads, kv_heads, head_dim):
    """GQA, MQA, MHA, and a head_dim whose half (40) is not a power of two."""
    tokens = 9
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=3, dtype=dtype)
    angles = randn(tokens, head_dim // 2, seed=4, dtype=torch.float32, scale=3)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected_q, expected_k = rotate_queries_and_keys_torch(qkv, cos, sin, heads, kv_heads, head_dim)
    q, k = rotate_queries_and_keys_triton(qkv, cos, sin, heads, kv_heads, head_dim)
    assert q.is_contiguous() and k.is_contiguous()
    assert (expected_q - qkv[:, :heads * head_dim].reshape(q.shape)).abs().max() > 0.1  # rotated at all
    assert_within_an_ulp(q, expected_q, dtype)
    assert_within_an_ulp(k, expected_k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, intermediate", [(1, 64), (5, 344), (2, 3000)])
def test_silu_and_mul_equals_torch(dtype, tokens, intermediate):
    """An intermediate size over one program's 1,024 columns, and one that is not a power of two."""
    gate_up = randn(tokens, 2 * intermediate, seed=5, dtype=dtype)
    assert_within_an_ulp(silu_and_mul_triton(gate_up), silu_and_mul_torch(gate_up), dtype)


def test_the_torch_forms_take_what_the_kernels_do_not():
    """Off, on the CPU, or a strided input: the torch form, bit for bit the reference."""
    residual = randn(4, 64, seed=6, dtype=torch.float32)
    weight = torch.ones(64, device=DEVICE)
    assert not fused_kernels_run(False, residual)
    assert fused_kernels_run(True, residual) == (DEVICE.type == "cuda")
    assert not fused_kernels_run(True, residual.t())  # not contiguous
    assert not fused_kernels_run(True, residual, weight.to(torch.float16))  # mixed dtypes
    assert not fused_kernels_run(True, residual[:0])  # no tokens: no zero-size grid
    summed, normed = add_rms_norm(residual, residual, weight, 1e-6, fused=False)
    expected = add_rms_norm_torch(residual, residual, weight, 1e-6)
    assert torch.equal(summed, expected[0]) and torch.equal(normed, expected[1])


def test_token_counts_never_compile_a_kernel_again():
    """A step's token count is a grid size or unspecialized: one launch key from 1 token to 33."""
    from model_shards.layer_kernels_triton import _add_rms_norm, _rotate_queries_and_keys, _silu_and_mul

    kernels = (_add_rms_norm, _rotate_queries_and_keys, _silu_and_mul)
    weight = torch.ones(64, device=DEVICE, dtype=torch.bfloat16)
    with LaunchKeys(*kernels) as launches:
        for tokens in (1, 16, 33):
            hidden = randn(tokens, 64, seed=tokens, dtype=torch.bfloat16)
            add_rms_norm_triton(hidden, hidden, weight, 1e-6)
            cos = torch.ones(tokens, 16, device=DEVICE, dtype=torch.bfloat16)
            rotate_queries_and_keys_triton(randn(tokens, 4 * 32, seed=7, dtype=torch.bfloat16), cos, cos, 2, 1, 32)
            silu_and_mul_triton(randn(tokens, 128, seed=8, dtype=torch.bfloat16))
    for kernel in kernels:
        assert len(launches.keys[kernel]) == 3 and len(set(launches.keys[kernel])) == 1, kernel
