"""Triton kernels for y = x @ W^T with W kept quantized (quantized_linear.py says what the formats are).

Program (i, j, s) owns output rows i*BM .., columns j*BN .. and, with split-K, the s-th slice of
the input columns. For each (BN x BK) weight tile it loads the quantized bytes, dequantizes them in
registers exactly as the reference does (float32(value) * float32(scale), rounded to the
activations' half type), then one (BM x BK) @ (BK x BN) tensor-core dot into a float32
accumulator (WEIGHT_LEFT: (BN x BK) @ (BK x BM), the tile as the dot's register operand). W in
half precision never reaches memory. The grouped kernel (routed experts) runs the same tile
product for one expert's rows and weight per program (quantized_experts.py).

A weight tile never straddles a scale block along K: BK divides 128 (an FP8 block) and is a
multiple of 32 (an FP4 scale group), and tiles start at multiples of BK. So an FP8 tile needs one
scale per row (rows // 128 picks the block row) and an FP4 tile BK / 32 scales per row.

Split-K (decode: a few hundred output tiles cannot keep 132 SMs reading) writes float32
partials (split, M, N) that one torch sum adds in a fixed order: deterministic, unlike atomics.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton
from model_shards.deepseek_v4.quantized_tiling import Tiling, split_k_plan


@triton.jit
def _ue8m0_to_float(byte):
    """uint8 exponents -> float32 2 ** (byte - 127), as torch.float8_e8m0fnu converts (255: NaN)."""
    bits = byte.to(tl.int32) << 23
    bits = tl.where(byte == 0, 0x00400000, bits)  # 2 ** -127 is a float32 subnormal
    bits = tl.where(byte == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_scales(scale_ptr, scale_rows, scale_cols, stride_scale, row_ok, SCALE_UE8M0: tl.constexpr):
    """float32 scales at (scale_rows, scale_cols) (any broadcastable shapes); 0 where not row_ok."""
    where = scale_ptr + scale_rows * stride_scale + scale_cols
    if SCALE_UE8M0:  # if/else as in _weight_tile
        scales = _ue8m0_to_float(tl.load(where, mask=row_ok, other=0))
    else:
        scales = tl.load(where, mask=row_ok, other=0.0)
    return scales


@triton.jit
def _e2m1_to_float(nibble):
    """int32 e2m1 codes 0..15 -> float32: 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign (8 is -0.0)."""
    exponent = (nibble >> 1) & 3
    mantissa = nibble & 1
    normal = (((exponent + 126) << 23) | (mantissa << 22)).to(tl.float32, bitcast=True)  # (1 + m/2) 2^(e-1)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal)
    return tl.where(nibble >= 8, -magnitude, magnitude)


@triton.jit
def _fp8_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale,
              BK: tl.constexpr, SCALE_UE8M0: tl.constexpr, HALF: tl.constexpr):
    """(BN, BK) half tile of rows `rows`, columns k0 .. k0 + BK of a block-scaled FP8 weight."""
    cols = k0 + tl.arange(0, BK)
    row_ok = rows < N
    inside = row_ok[:, None] & (cols < K)[None, :]
    values = tl.where(inside, tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=inside).to(tl.float32), 0.0)
    scales = _row_scales(scale_ptr, rows // 128, k0 // 128, stride_scale, row_ok, SCALE_UE8M0)  # (BN,)
    return (values * scales[:, None]).to(HALF)


@triton.jit
def _fp4_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale, BK: tl.constexpr, HALF: tl.constexpr):
    """(BN, BK) half tile of an FP4 weight: byte c holds columns 2c (low nibble) and 2c + 1."""
    byte_cols = k0 // 2 + tl.arange(0, BK // 2)
    row_ok = rows < N
    packed = tl.load(w_ptr + rows[:, None] * stride_w + byte_cols[None, :],
                     mask=row_ok[:, None] & (byte_cols < K // 2)[None, :], other=0).to(tl.int32)
    values = tl.join(_e2m1_to_float(packed & 15), _e2m1_to_float((packed >> 4) & 15))  # (BN, BK/2, 2)
    values = tl.reshape(values, (values.shape[0], BK // 32, 32))  # (BN, scale groups, 32)
    groups = k0 // 32 + tl.arange(0, BK // 32)
    scales = _row_scales(scale_ptr, rows[:, None], groups[None, :], stride_scale,
                         row_ok[:, None] & (groups < tl.cdiv(K, 32))[None, :], True)  # (BN, BK/32)
    return tl.reshape(values * scales[:, :, None], (values.shape[0], BK)).to(HALF)


@triton.jit
def _weight_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale,
                 BK: tl.constexpr, FORMAT: tl.constexpr, SCALE_UE8M0: tl.constexpr, HALF: tl.constexpr):
    if FORMAT == 0:  # if/else, not an early return: the compiler would build the other branch too
        tile = _fp8_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale, BK, SCALE_UE8M0, HALF)
    else:
        tile = _fp4_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale, BK, HALF)
    return tile


@triton.jit
def _tile_of_program(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the weight tiles
    they share are read from L2 (prefill); returns (first row, first column)."""
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    pid = tl.program_id(0)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    tile_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
    return tile_m * BM, tile_n * BN


@triton.jit
def _tile_product(x_ptr, w_ptr, scale_ptr, rows, row_end, cols, N, K, k_begin, k_end, stride_x, stride_w,
                  stride_scale, FORMAT: tl.constexpr, SCALE_UE8M0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, WEIGHT_LEFT: tl.constexpr):
    """float32 x[rows, k_begin:k_end] @ W[cols, k_begin:k_end]^T: (BM, BN), or (BN, BM) if WEIGHT_LEFT."""
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BN, BM) if WEIGHT_LEFT else (BM, BN), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + ks[None, :], mask=(rows < row_end)[:, None] & (ks < k_end)[None, :], other=0.0)
        w = _weight_tile(w_ptr, scale_ptr, cols, k0, N, K, stride_w, stride_scale,
                         BK, FORMAT, SCALE_UE8M0, x.dtype)  # (BN, BK)
        if WEIGHT_LEFT:  # y^T = W x^T: the dequantized tile is the dot's register operand
            acc += tl.dot(w, tl.trans(x), out_dtype=tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32)
    return acc


@triton.jit
def _store_tile(out_ptr, acc, rows, row_end, cols, N, stride_out, WEIGHT_LEFT: tl.constexpr):
    out_rows = out_ptr + rows.to(tl.int64) * stride_out  # (BM,)
    if WEIGHT_LEFT:
        tl.store(out_rows[None, :] + cols[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < row_end)[None, :] & (cols < N)[:, None])
    else:
        tl.store(out_rows[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit(do_not_specialize=["M"])  # a step's row count varies: no compile per divisibility
def _quantized_matmul(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, k_per_split,
    stride_x, stride_w, stride_scale, stride_out_split, stride_out,
    FORMAT: tl.constexpr, SCALE_UE8M0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, WEIGHT_LEFT: tl.constexpr,
):
    first_m, first_n = _tile_of_program(M, N, BM, BN, GROUP_M)
    rows = first_m + tl.arange(0, BM)
    cols = first_n + tl.arange(0, BN)  # output columns = weight rows
    k_begin = tl.program_id(1) * k_per_split
    acc = _tile_product(x_ptr, w_ptr, scale_ptr, rows, M, cols, N, K, k_begin, tl.minimum(k_begin + k_per_split, K),
                        stride_x, stride_w, stride_scale, FORMAT, SCALE_UE8M0, BM, BN, BK, WEIGHT_LEFT)
    _store_tile(out_ptr + tl.program_id(1) * stride_out_split, acc, rows, M, cols, N, stride_out, WEIGHT_LEFT)


@triton.jit
def _grouped_quantized_matmul(
    x_ptr, w_ptr, scale_ptr, out_ptr, slot_expert_ptr, slot_row_ptr, offsets_ptr, experts, N, K,
    stride_x, stride_w_expert, stride_w, stride_scale_expert, stride_scale, stride_out,
    FORMAT: tl.constexpr, SCALE_UE8M0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    WEIGHT_LEFT: tl.constexpr,
):
    """Program (slot, j): the slot's BM rows of one expert's group (expert_tile_slots) times that
    expert's weight columns j*BN ..; slots past the last tile (expert == experts) do nothing."""
    expert = tl.load(slot_expert_ptr + tl.program_id(0))
    if expert < experts:
        rows = tl.load(slot_row_ptr + tl.program_id(0)) + tl.arange(0, BM)
        row_end = tl.load(offsets_ptr + expert)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = _tile_product(x_ptr, w_ptr + expert.to(tl.int64) * stride_w_expert,
                            scale_ptr + expert.to(tl.int64) * stride_scale_expert, rows, row_end, cols, N, K, 0, K,
                            stride_x, stride_w, stride_scale, FORMAT, SCALE_UE8M0, BM, BN, BK, WEIGHT_LEFT)
        _store_tile(out_ptr, acc, rows, row_end, cols, N, stride_out, WEIGHT_LEFT)


@triton.jit
def _dequantize(w_ptr, scale_ptr, out_ptr, N, K, stride_w, stride_scale, stride_out,
                FORMAT: tl.constexpr, SCALE_UE8M0: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The matmul's weight tiles, stored: W in half precision (for tests, and loaders that want it)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    tile = _weight_tile(w_ptr, scale_ptr, rows, k0, N, K, stride_w, stride_scale,
                        BK, FORMAT, SCALE_UE8M0, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], tile, mask=(rows < N)[:, None] & (cols < K)[None, :])


def launch_quantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: int,
                            scale_ue8m0: bool, in_features: int, out: torch.Tensor, tiling: Tiling) -> None:
    """x (M, K) half, weight bytes (N, K) fp8 or (N, K/2) uint8, scale as the format says (uint8
    when ue8m0) -> out (splits, M, N) (split_k_plan): float32 partials if several, else the result."""
    rows, cols = x.shape[0], weight.shape[0]
    per_split, splits = split_k_plan(in_features, tiling)
    if out.shape != (splits, rows, cols):
        raise ValueError(f"quantized matmul: out {tuple(out.shape)} is not (splits, M, N) = {(splits, rows, cols)}")
    grid = (triton.cdiv(rows, tiling.block_m) * triton.cdiv(cols, tiling.block_n), splits)
    _quantized_matmul[grid](
        x, weight, scale, out, rows, cols, in_features, per_split,
        x.stride(0), weight.stride(0), scale.stride(0), out.stride(0), out.stride(1),
        FORMAT=fmt, SCALE_UE8M0=scale_ue8m0, BM=tiling.block_m, BN=tiling.block_n, BK=tiling.block_k,
        GROUP_M=8, WEIGHT_LEFT=tiling.weight_left, num_warps=tiling.warps, num_stages=tiling.stages,
    )


def launch_dequantize(weight: torch.Tensor, scale: torch.Tensor, fmt: int, scale_ue8m0: bool,
                      out: torch.Tensor, block_n: int = 64, block_k: int = 128) -> None:
    """out (N, K) half <- the weight dequantized by the matmul's own tile code."""
    rows, cols = out.shape
    grid = (triton.cdiv(rows, block_n), triton.cdiv(cols, block_k))
    _dequantize[grid](weight, scale, out, rows, cols, weight.stride(0), scale.stride(0), out.stride(0),
                      FORMAT=fmt, SCALE_UE8M0=scale_ue8m0, BN=block_n, BK=block_k)


def launch_grouped_quantized_matmul(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: int,
                                    scale_ue8m0: bool, in_features: int, slots: tuple[torch.Tensor, torch.Tensor],
                                    offsets: torch.Tensor, out: torch.Tensor, tiling: Tiling) -> None:
    """rows (R, K) half sorted by expert, weight bytes (E, N, K | K/2), scale (E, ...), slots
    (slot_expert, slot_row) (S,) int32, offsets (E,) int32 group ends -> out (R, N)."""
    slot_expert, slot_row = slots
    experts, cols = weight.shape[0], weight.shape[1]
    grid = (slot_expert.shape[0], triton.cdiv(cols, tiling.block_n))
    _grouped_quantized_matmul[grid](
        rows, weight, scale, out, slot_expert, slot_row, offsets, experts, cols, in_features,
        rows.stride(0), weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        FORMAT=fmt, SCALE_UE8M0=scale_ue8m0, BM=tiling.block_m, BN=tiling.block_n, BK=tiling.block_k,
        WEIGHT_LEFT=tiling.weight_left, num_warps=tiling.warps, num_stages=tiling.stages,
    )
