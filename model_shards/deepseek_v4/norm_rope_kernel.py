"""The fused RMS norm + interleaved RoPE kernel (what and why: norm_rope.py). One program per
block of rows: the whole row for the norm factor and the nope channels, then the rope channels
again as (even, odd) pairs."""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton


@triton.jit(do_not_specialize=["rows"])  # a step's row count varies; it only bounds the mask
def _norm_rope(x_ptr, cos_ptr, sin_ptr, out_ptr, weight_ptr, rows, rows_per_token, dim, half, eps,
               NORM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = row < rows
    cols = tl.arange(0, BD)
    rope_start = dim - 2 * half
    factor = tl.zeros((BR,), dtype=tl.float32)
    if NORM != 0:
        x = tl.load(x_ptr + row[:, None] * dim + cols[None, :], mask=row_ok[:, None] & (cols < dim)[None, :],
                    other=0.0).to(tl.float32)  # (BR, BD)
        factor = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)
        if NORM == 1:  # norms.unweighted_rms_norm: factor in x's dtype, product rounded
            y = x * factor.to(x_ptr.dtype.element_ty).to(tl.float32)[:, None]
        else:  # norms.RMSNorm: float32 weight times the float32 normed row
            y = tl.load(weight_ptr + cols, mask=cols < dim, other=0.0)[None, :] * (x * factor[:, None])
        nope = (cols < rope_start)[None, :]
        tl.store(out_ptr + row[:, None] * dim + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & nope)
    pairs = tl.arange(0, BH)
    pair_ok = row_ok[:, None] & (pairs < half)[None, :]
    even_at = row[:, None] * dim + rope_start + 2 * pairs[None, :]  # (BR, BH)
    even = _normed(x_ptr, weight_ptr, even_at, rope_start + 2 * pairs, pairs < half, factor, pair_ok, NORM)
    odd = _normed(x_ptr, weight_ptr, even_at + 1, rope_start + 2 * pairs + 1, pairs < half, factor, pair_ok, NORM)
    token = row // rows_per_token
    cos = tl.load(cos_ptr + token[:, None] * half + pairs[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token[:, None] * half + pairs[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + even_at, (even * cos - odd * sin).to(out_ptr.dtype.element_ty), mask=pair_ok)
    tl.store(out_ptr + even_at + 1, (odd * cos + even * sin).to(out_ptr.dtype.element_ty), mask=pair_ok)


@triton.jit
def _normed(x_ptr, weight_ptr, at, channel, channel_ok, factor, mask, NORM: tl.constexpr):
    """Channels of the rope part after the norm, rounded to x's dtype as torch's norm output is."""
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    if NORM == 1:
        x = (x.to(tl.float32) * factor.to(x_ptr.dtype.element_ty).to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)
    elif NORM == 2:
        weight = tl.load(weight_ptr + channel, mask=channel_ok, other=0.0)[None, :]
        x = (weight * (x.to(tl.float32) * factor[:, None])).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


def launch_norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                     weight: torch.Tensor | None, rows: int, rows_per_token: int, dim: int, half: int, norm: int,
                     eps: float) -> None:
    block_rows = 4 if dim > 256 else 16
    _norm_rope[(triton.cdiv(rows, block_rows),)](
        x, cos, sin, out, weight if weight is not None else x, rows, rows_per_token, dim, half, eps,
        NORM=norm, BR=block_rows, BD=triton.next_power_of_2(dim), BH=triton.next_power_of_2(half), num_warps=4)
