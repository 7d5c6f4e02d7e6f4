"""DeepSeek's block-scaled weights (model_shards/deepseek_v4/block_format.py): DeepSeek's block
semantics element by element, partial blocks, a rank's part starting inside a block, FP4 nibble
order, and transformers' dequantizer where its grid-derived blocks agree with DeepSeek's."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.block_format import (E2M1_VALUES, FP8_MAX, BlockScaledPart, dequantize, part_of_grid,
                                                   quantize_fp4, quantize_fp8, unpack_fp4)


def random_fp8(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def elementwise(values: torch.Tensor, grid: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The definition, one element at a time: value[i, j] * grid[i // bm, j // bn]."""
    out = torch.empty(values.shape)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = values[i, j].float() * grid[i // block[0], j // block[1]]
    return out


def test_partial_blocks_follow_deepseeks_ceil_grid():
    values, block = random_fp8(200, 136), (128, 128)  # 2 x 2 blocks, the last ones partial
    grid = torch.tensor([[0.5, 2.0 ** -7], [3.0, 0.125]])
    expected = elementwise(values, grid, block)
    assert torch.equal(dequantize(BlockScaledPart(values, grid, block), torch.float32), expected)


@pytest.mark.parametrize("dim, cuts", [(0, [0, 64, 100, 200]), (1, [0, 20, 129, 136])])
def test_a_part_starting_inside_a_block_takes_its_blocks_scales(dim, cuts):
    """Each slice is dequantized on its own (as a rank loads its shard) from the whole grid."""
    values, block = random_fp8(200, 136, seed=1), (128, 128)
    grid = torch.rand(2, 2) + 0.5
    whole = elementwise(values, grid, block)
    for start, stop in zip(cuts, cuts[1:]):
        piece = values.narrow(dim, start, stop - start)
        first = (start, 0) if dim == 0 else (0, start)
        part = part_of_grid(piece, grid, block, *first)
        assert torch.equal(dequantize(part, torch.float32), whole.narrow(dim, start, stop - start))


def test_fp4_low_nibble_is_the_even_column():
    packed = torch.tensor([[0x2F, 0x71]], dtype=torch.uint8)  # codes (F, 2), (1, 7)
    assert unpack_fp4(packed).tolist() == [[-6.0, 1.0, 0.5, 6.0]]


def test_fp4_quantization_keeps_representable_values_and_rounds_the_rest():
    magnitudes = torch.tensor(E2M1_VALUES[:8])
    exact = torch.cat([magnitudes, -magnitudes.flip(0)] * 2)[None] * 0.25  # (1, 32): amax 1.5 -> scale 0.25
    packed, scales = quantize_fp4(exact)
    assert scales.float().tolist() == [[0.25]] and packed.dtype == torch.int8 and packed.shape == (1, 16)
    part = BlockScaledPart(packed.view(torch.uint8), scales, (1, 32))
    assert torch.equal(dequantize(part, torch.float32), exact)
    noisy = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    packed, scales = quantize_fp4(noisy)
    error = dequantize(BlockScaledPart(packed.view(torch.uint8), scales, (1, 32)), torch.float32) - noisy
    scale = scales.float().repeat_interleave(32, 1)  # (4, 64)
    assert (scale <= noisy.abs().view(4, 2, 32).amax(-1).repeat_interleave(32, 1) / 3).all()  # <= 2 x amax / 6
    assert (error.abs() <= scale).all()  # nearest e2m1: the widest gap (4 to 6) is 2 scales
    assert (error.abs() > scale / 8).any()  # and it did round


@pytest.mark.parametrize("ue8m0", [True, False])
def test_fp8_quantization_scales(ue8m0):
    weight = torch.randn(256, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    values, scales = quantize_fp8(weight, (128, 128), ue8m0)
    assert scales.shape == (2, 2) and scales.dtype == (torch.float8_e8m0fnu if ue8m0 else torch.float32)
    amax = weight.abs().view(2, 128, 2, 96).amax(dim=(1, 3))[:, :, None].expand(2, 2, 1)
    scale_values = scales.float()
    assert (scale_values * FP8_MAX >= amax[..., 0] * (1 - 1e-6)).all()  # nothing clips
    if ue8m0:
        assert torch.equal(scale_values.log2(), scale_values.log2().round())  # powers of two
    restored = dequantize(BlockScaledPart(values, scales, (128, 128)), torch.float32)
    assert (restored - weight).abs().max() <= weight.abs().max() / 8  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("kind", ["fp8-float", "fp8-ue8m0-bytes", "fp4"])
def test_equal_to_transformers_dequantizer_on_whole_blocks(kind):
    finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")  # the GPU image may lack it
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(4))
    if kind == "fp4":
        values, scales = quantize_fp4(weight)
        part = BlockScaledPart(values.view(torch.uint8), scales, (1, 32))
    else:
        values, scales = quantize_fp8(weight, (128, 128), ue8m0=kind != "fp8-float")
        scales = scales.view(torch.uint8) if kind == "fp8-ue8m0-bytes" else scales  # raw ue8m0 bytes
        part = BlockScaledPart(values, scales, (128, 128))
    expected = finegrained_fp8.Fp8Dequantize(None)._dequantize_one(values, scales, torch.float32)
    assert torch.equal(dequantize(part, torch.float32), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["fp8-ue8m0", "fp8-float", "fp4"])
def test_dequantizing_on_the_gpu_equals_the_cpu(kind):
    """The loader dequantizes on the parameter's device: ue8m0 and FP4 unpacking there too."""
    weight = torch.randn(384, 256, generator=torch.Generator().manual_seed(5))
    if kind == "fp4":
        values, scales = quantize_fp4(weight)
        part = part_of_grid(values.view(torch.uint8)[100:300], scales, (1, 32), first_row=100)
    else:
        values, scales = quantize_fp8(weight, (128, 128), ue8m0=kind == "fp8-ue8m0")
        part = part_of_grid(values[100:300], scales, (128, 128), first_row=100)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(part.to("cuda"), dtype).cpu(), dequantize(part, dtype))
