"""Quantized DeepSeek-V4 weights (FP8 128x128 block-scaled, FP4 row-scaled): the Triton kernels
(in Triton's interpreter on a CPU, with gpu_bf16_numerics: interpreter_numerics.py says why)
against the torch reference, dequantize() = bf16(float32(value) * float32(scale)).

- The in-kernel dequantization is bit-exact: every fp8 byte and fp4 code, partial blocks.
- The matmul differs from the exact product of the dequantized operands only by float32
  summation order and the final rounding to bf16. Per output, with p_i = x_i * w_i (exact in
  float32: bf16 x bf16 has 16 significant bits), any float32 summation order gives
  |s - S| <= gamma_{K-1} sum |p_i|, gamma_n ~ n 2^-24 (2^-23 allowed: tensor-core adders may
  truncate); rounding s to bf16 adds 2^-8 |s|. So the assertion is
      |y - S| <= 2^-8 |S| + K 2^-22 sum_i |x_i| |w_i|.
  The reference F.linear obeys the same bound (asserted too), so the two differ by at most twice it.
  A wrong scale on one block moves an output by about that block's share of |S|, far outside.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_shards.deepseek_v4.block_format import dequantize as block_dequantize
from model_shards.deepseek_v4.block_format import part_of_grid, quantize_fp4, quantize_fp8
from model_shards.deepseek_v4.grouped_experts import grouped_linear, sort_by_expert
from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics
from model_shards.deepseek_v4.quantized_experts import QuantizedExperts, expert_tile_slots, grouped_quantized_matmul
from model_shards.deepseek_v4.quantized_linear import (Fp4RowWeight, Fp8BlockWeight, QuantizedWeight, Tiling,
                                                       default_tiling, dequantize_triton, from_block_scaled_part,
                                                       linear, quantized_matmul, split_k_plan, ue8m0_to_float)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[2]
FP8_NAN_BYTES = (0x7F, 0xFF)  # e4m3fn's only NaNs; checkpoints hold none (the interpreter reads them as 480)


@pytest.fixture(autouse=True)
def bf16_like_the_gpu():
    with gpu_bf16_numerics():
        yield


def fp8_weight(rows: int, cols: int, ue8m0: bool, seed: int = 0) -> Fp8BlockWeight:
    generator = torch.Generator().manual_seed(seed)
    bytes_ = torch.randint(0, 256, (rows, cols), generator=generator, dtype=torch.uint8)
    bytes_[(bytes_ == FP8_NAN_BYTES[0]) | (bytes_ == FP8_NAN_BYTES[1])] = 0x3F
    grid = (-(-rows // 128), -(-cols // 128))
    if ue8m0:  # 2 ** (e - 127): weights of ~1e-2 times fp8 values up to 448
        scale = torch.randint(110, 122, grid, generator=generator, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    else:
        scale = torch.rand(grid, generator=generator) * 1e-3 + 1e-5
    return Fp8BlockWeight(bytes_.view(torch.float8_e4m3fn).to(DEVICE), scale.to(DEVICE))


def fp4_weight(rows: int, cols: int, seed: int = 0, int8: bool = True) -> Fp4RowWeight:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols // 2), generator=generator, dtype=torch.uint8)
    scale = torch.randint(118, 126, (rows, -(-cols // 32)), generator=generator, dtype=torch.uint8)
    return Fp4RowWeight((codes.view(torch.int8) if int8 else codes).to(DEVICE), scale.to(DEVICE))


def exact_product(x: torch.Tensor, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W^T, |x| @ |W|^T) in float64 from the bf16 operands: exact products, near-exact sums."""
    w = weight.dequantize().double()
    return x.double() @ w.T, x.double().abs() @ w.abs().T


def assert_within_summation_order(y: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight) -> None:
    exact, magnitude = exact_product(x, weight)
    bound = 2.0 ** -8 * exact.abs() + x.shape[-1] * 2.0 ** -22 * magnitude
    excess = (y.double() - exact).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond the summation-order bound"


def test_ue8m0_decodes_as_torch_float8_e8m0fnu():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = every_byte.view(torch.float8_e8m0fnu).float()
    assert torch.equal(ue8m0_to_float(every_byte).view(torch.int32)[:255], expected.view(torch.int32)[:255])
    assert ue8m0_to_float(every_byte)[255].isnan() and expected[255].isnan()
    assert ue8m0_to_float(torch.tensor([127, 130], dtype=torch.uint8)).tolist() == [1.0, 8.0]


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_dequantized_in_the_kernel_bit_for_bit(ue8m0):
    """Every non-NaN e4m3 byte (subnormals, +-0, 448) over partial 128-blocks both ways."""
    weight = fp8_weight(200, 300, ue8m0)
    weight.weight.view(torch.uint8)[:2, :256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    weight.weight.view(torch.uint8)[:2, FP8_NAN_BYTES[0]] = 0
    weight.weight.view(torch.uint8)[:2, FP8_NAN_BYTES[1]] = 0
    reference = weight.dequantize()
    assert reference.dtype == torch.bfloat16 and reference.abs().max() > 0.01
    assert torch.equal(dequantize_triton(weight).view(torch.int16), reference.view(torch.int16))


def test_dequantized_values_round_to_nearest_even_like_torch():
    """float32 value * scale, then bf16 by round-to-nearest-even (the interpreter alone would truncate):
    a tie to even below, a tie to even above, and just above a tie."""
    ones = torch.ones(1, 384).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -23]])
    weight = Fp8BlockWeight(ones.to(DEVICE), scale.to(DEVICE))
    assert weight.dequantize()[0, ::128].tolist() == [1.0, 1 + 2.0 ** -6, 1 + 2.0 ** -7]
    assert torch.equal(dequantize_triton(weight), weight.dequantize())


def test_fp4_dequantized_in_the_kernel_bit_for_bit():
    """Every byte (all 16 x 16 code pairs, -0.0 included), K = 100: a partial 32-column group."""
    weight = fp4_weight(70, 100)
    weight.weight.view(torch.uint8)[:6].view(-1)[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    reference = weight.dequantize()
    assert reference.shape == (70, 100) and (reference.view(torch.int16) == -32768).any()  # -0.0 kept
    assert torch.equal(dequantize_triton(weight).view(torch.int16), reference.view(torch.int16))


def test_fp4_reference_decodes_nibbles_low_first():
    codes = torch.tensor([[0x21, 0xF7] + [0] * 14], dtype=torch.uint8)  # 1 -> .5, 2 -> 1, 7 -> 6, F -> -6
    weight = Fp4RowWeight(codes, torch.tensor([[128]], dtype=torch.uint8))  # scale 2
    assert weight.dequantize()[0, :4].tolist() == [1.0, 2.0, 12.0, -12.0]


TILINGS = {"decode split-K": Tiling(16, 32, 128, 4, 1, split_k=3), "prefill": Tiling(64, 64, 64, 4, 1),
           "narrow": Tiling(32, 16, 32, 4, 1), "weight left": Tiling(16, 32, 64, 4, 1, split_k=2, weight_left=True),
           "more splits than k tiles": Tiling(16, 64, 128, 4, 1, split_k=4)}  # K ~ 300: 3 tiles of 128
CASES = [(1, "decode split-K"), (7, "decode split-K"), (1, "narrow"), (7, "narrow"), (7, "prefill"), (300, "prefill"),
         (1, "weight left"), (30, "weight left"), (1, "more splits than k tiles")]


@pytest.mark.parametrize("rows, tiling", CASES)
@pytest.mark.parametrize("kind", ["fp8 float32", "fp8 ue8m0", "fp4"])
def test_matmul_equals_the_reference_up_to_summation_order(kind, rows, tiling):
    """N = 200, K = 300 (FP8: partial 128-blocks, partial tiles; FP4: K = 296, a partial group)."""
    weight = fp4_weight(200, 296, seed=rows) if kind == "fp4" else fp8_weight(200, 300, kind == "fp8 ue8m0", seed=rows)
    x = torch.randn(rows, weight.in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE, torch.bfloat16)
    y = quantized_matmul(x, weight, TILINGS[tiling])
    assert y.shape == (rows, 200) and y.dtype == torch.bfloat16
    reference = F.linear(x, weight.dequantize())
    assert_within_summation_order(y, x, weight)
    assert_within_summation_order(reference, x, weight)
    assert (y == reference).float().mean() > 0.9  # most outputs round to the same bf16


def test_the_bound_rejects_a_wrong_block_scale():
    weight = fp8_weight(200, 300, ue8m0=False)
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    scale = weight.scale.clone()
    scale[1, 2] *= 1.5
    wrong = F.linear(x, Fp8BlockWeight(weight.weight, scale).dequantize())
    with pytest.raises(AssertionError, match="summation-order bound"):
        assert_within_summation_order(wrong, x, weight)


def test_linear_keeps_leading_dims_and_runs_the_reference_off_cuda():
    weight = fp4_weight(40, 64)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    y = weight.linear(x)
    assert y.shape == (2, 3, 40)
    assert_within_summation_order(y.view(6, 40), x.view(6, 64), weight)
    x32 = x.float()
    assert torch.equal(weight.linear(x32), F.linear(x32, weight.dequantize(torch.float32)))
    assert torch.equal(linear(x32, weight), weight.linear(x32))
    assert torch.equal(linear(x32, weight.dequantize(torch.float32)), weight.linear(x32))  # a plain weight


@pytest.mark.parametrize("fp4", [False, True])
def test_the_loaders_parts_stay_quantized_with_its_dequantization(fp4):
    """block_format.py's parts (what the loader reads for a rank) as kernel weights: the same
    dequantized values as the loader's own reference; a shard starting inside a block is refused."""
    w = torch.randn(300, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    block = (1, 32) if fp4 else (128, 128)
    values, grid = quantize_fp4(w) if fp4 else quantize_fp8(w, block, ue8m0=True)
    values = values.view(torch.uint8) if fp4 else values  # the loader's FP4 parts hold uint8
    byte_cols = 128 if fp4 else 256  # columns 256.. of the weight
    part = part_of_grid(values[:, byte_cols:], grid, block, first_col=256)
    weight = from_block_scaled_part(part)
    assert torch.equal(weight.dequantize().view(torch.int16), block_dequantize(part, torch.bfloat16).view(torch.int16))
    on_device = type(weight)(weight.weight.to(DEVICE), weight.scale.to(DEVICE))
    assert torch.equal(dequantize_triton(on_device).cpu(), weight.dequantize())
    with pytest.raises(ValueError, match="block boundaries"):
        from_block_scaled_part(part_of_grid(values[:, 8 if fp4 else 16:], grid, block, first_col=16))


def test_default_tilings_split_k_for_decode_only():
    weight = fp8_weight(256, 1024, ue8m0=True)
    decode = default_tiling(1, weight, processors=132)
    assert (decode.block_m, decode.split_k) == (16, 8)  # 4 column tiles x 8 splits; K has 8 tiles of 128
    assert default_tiling(48, weight, processors=132).block_m == 64
    prefill = default_tiling(4096, weight, processors=132)
    assert (prefill.block_m, prefill.block_n, prefill.split_k) == (128, 128, 1)
    assert split_k_plan(1024, Tiling(16, 64, 128, 4, 4, split_k=5)) == (256, 4)  # whole tiles: 4 splits of 2
    assert split_k_plan(300, Tiling(16, 64, 32, 4, 4, split_k=4)) == (96, 4)


def test_bad_shapes_are_rejected_with_a_message():
    weight = fp8_weight(200, 300, ue8m0=False)
    with pytest.raises(ValueError, match=r"scale must be \(2, 3\)"):
        Fp8BlockWeight(weight.weight, weight.scale[:, :2])
    with pytest.raises(ValueError, match="scale must be"):
        Fp4RowWeight(torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 1))  # float scales: not FP4's
    with pytest.raises(ValueError, match="does not fit"):
        quantized_matmul(torch.zeros(1, 299, dtype=torch.bfloat16, device=DEVICE), weight)
    with pytest.raises(ValueError, match="block_k must divide"):
        quantized_matmul(torch.zeros(1, 300, dtype=torch.bfloat16, device=DEVICE), weight, Tiling(16, 16, 96, 4, 1))


@pytest.mark.slow
@pytest.mark.parametrize("bench, says", [("quantized_linear", "dequantized tile bit-exact: True"),
                                         ("quantized_experts", "fp4 experts down")])
def test_bench_smoke_runs_on_a_cpu(bench, says):
    result = subprocess.run([sys.executable, f"bench/{bench}.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})  # CUDA or not
    assert result.returncode == 0, result.stderr[-2000:]
    assert says in result.stdout and "100.0% identical" in result.stdout


# --- routed experts: the grouped kernel (quantized_experts.py) ------------------------------------


def test_expert_tile_slots_cover_each_group_in_tiles_of_its_own():
    """Groups of 3, 0, 17 and 1 rows, 4 rows elsewhere (remote); tiles of 8 rows."""
    slot_expert, slot_row = expert_tile_slots(torch.tensor([3, 3, 20, 21], dtype=torch.int32), 25, 8)
    assert slot_expert.tolist() == [0, 2, 2, 2, 3, 4, 4, 4]  # S = ceil(25 / 8) + 4; 4 = idle
    assert slot_row.tolist()[:5] == [0, 3, 11, 19, 20]


def routed_rows(tokens: int, experts: int, in_features: int, remote: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R, K) bf16 sorted by expert, k = 2 slots a token, and offsets (E,): sort_by_expert's."""
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts + (2 if remote else 0), (tokens, 2), generator=generator)  # >= E: remote
    routing = sort_by_expert(ids, experts)
    x = torch.randn(tokens, in_features, generator=generator).to(torch.bfloat16)
    return x[routing.tokens].to(DEVICE), routing.offsets.to(DEVICE)


def stacked(kind: str, experts: int, rows: int, cols: int) -> QuantizedExperts:
    one = [fp4_weight(rows, cols, seed=e) if kind == "fp4" else fp8_weight(rows, cols, True, seed=e)
           for e in range(experts)]
    return QuantizedExperts(torch.stack([w.weight for w in one]), torch.stack([w.scale for w in one]), type(one[0]))


@pytest.mark.parametrize("tiling", [Tiling(16, 32, 64, 4, 1), Tiling(32, 64, 128, 4, 1, weight_left=True)])
@pytest.mark.parametrize("kind, remote", [("fp8", True), ("fp4", False)])
def test_grouped_experts_equal_each_experts_reference(kind, remote, tiling):
    """5 experts (one maybe empty), N = 72, K = 160: each group within the bound of its expert."""
    experts = stacked(kind, 5, 72, 160)
    rows, offsets = routed_rows(23, 5, 160, remote)
    out = grouped_quantized_matmul(rows, experts, offsets, tiling)
    reference = grouped_linear(rows, experts.dequantize(), offsets)
    begin = 0
    for expert, end in enumerate(offsets.tolist()):
        assert_within_summation_order(out[begin:end], rows[begin:end], experts.expert(expert))
        begin = end
    assert (out[:begin] == reference[:begin]).float().mean() > 0.9
    assert begin > 20 and (begin < rows.shape[0]) == remote  # remote rows: left undefined, not compared


def test_grouped_linear_off_cuda_is_grouped_linear_of_the_dequantized_experts():
    experts = stacked("fp4", 3, 40, 64)
    rows, offsets = routed_rows(6, 3, 64, remote=False)
    expected = grouped_linear(rows.float(), experts.dequantize(torch.float32), offsets)
    assert torch.equal(experts.grouped_linear(rows.float(), offsets), expected)


def test_grouped_experts_reject_mismatched_stacks():
    experts = stacked("fp8", 2, 72, 160)
    with pytest.raises(ValueError, match="stacks of one length"):
        QuantizedExperts(experts.weight, experts.scale[:1], Fp8BlockWeight)
    with pytest.raises(ValueError, match="scale must be"):
        QuantizedExperts(experts.weight, experts.scale[:, :, :1], Fp8BlockWeight)
    with pytest.raises(ValueError, match="do not fit 2 experts"):
        grouped_quantized_matmul(torch.zeros(3, 100, dtype=torch.bfloat16, device=DEVICE), experts,
                                 torch.tensor([1, 3], device=DEVICE))
