"""mHC (hyper_connections.py) as four Triton kernels, one launch each instead of ~100 small ops.

Around every block, in torch, the streams (T, hc, hidden) pass through float32 copies several
times and the Sinkhorn projection is 2 * iterations tiny launches; at decode (T = 1) that is
launch-bound (half a step's time), at prefill memory-bound. Here:

    stream_mixes     (T, hc * hidden) -> (T, N) float32: x @ fn^T * rsqrt(mean(x^2) + eps), one
                     pass over the streams (the RMS norm is a per-token scalar, applied after the
                     product: the same value up to float32 rounding order); float32 products
                     ("ieee", no TF32) so a float32 model stays exact
    hyper_weights    mixes -> pre (T, hc), post (T, hc), comb (T, hc, hc): sigmoids, softmax and
                     all Sinkhorn iterations in registers
    collapse         sum_s pre[s] * streams[s]                              -> (T, hidden)
    mix              post[o] * block_output + sum_s comb[s, o] * streams[s]  -> (T, hc, hidden)

Every sum runs in float32 and rounds once to the streams' dtype. hc must be a power of two
(4 in V4-Flash, 2 in the tiny preset); the torch forms in hyper_connections.py are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.attention.triton_runtime import tl, triton

BLOCK_HIDDEN = 1024  # columns of the hidden state per program of collapse / mix


@triton.jit(do_not_specialize=["tokens"])  # a step's token count varies; it only bounds the mask
def _stream_mixes(x_ptr, fn_ptr, out_ptr, squares_ptr, tokens, width, outputs, split_width, eps, stride_x,
                  stride_fn, stride_out, BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                  SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row tile, split): the product over columns split * split_width onward. One split
    finishes the rows (RMS factor applied); several write float32 partials (split, T, N) and their
    sums of squares (split, T) for `_finish_split_mixes`."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    split = tl.program_id(1)
    cols = tl.arange(0, BN)
    row_ok, col_ok = rows < tokens, cols < outputs
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    squares = tl.zeros((BT,), dtype=tl.float32)
    first = split * split_width
    for start in range(first, first + split_width, BK):
        ks = start + tl.arange(0, BK)
        k_ok = ks < width
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # (BT, BK)
        weight = tl.load(fn_ptr + cols[:, None] * stride_fn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0)  # (BN, BK): rows of fn, read along their contiguous dimension
        squares += tl.sum(x * x, axis=1)
        acc += tl.dot(x, tl.trans(weight), input_precision=PRECISION)
    if SPLIT == 1:
        acc = acc * (1.0 / tl.sqrt(squares / width + eps))[:, None]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        partial = out_ptr + split * tokens * stride_out
        tl.store(partial + rows[:, None] * stride_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.store(squares_ptr + split * tokens + rows, squares, mask=row_ok)


@triton.jit(do_not_specialize=["tokens"])
def _finish_split_mixes(part_ptr, squares_ptr, out_ptr, tokens, width, outputs, eps, stride_out,
                        SPLIT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """Sums the splits' partials in split order and applies the RMS factor: (T, N) float32."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BN)
    row_ok, mask = rows < tokens, (rows < tokens)[:, None] & (cols < outputs)[None, :]
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    squares = tl.zeros((BT,), dtype=tl.float32)
    for split in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + (split * tokens + rows[:, None]) * stride_out + cols[None, :], mask=mask, other=0.0)
        squares += tl.load(squares_ptr + split * tokens + rows, mask=row_ok, other=0.0)
    acc = acc * (1.0 / tl.sqrt(squares / width + eps))[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["tokens"])
def _hyper_weights(mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, tokens, stride_mix, hc_eps,
                   iterations, S: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = rows < tokens
    streams = tl.arange(0, S)
    cells = streams[:, None] * S + streams[None, :]  # (S, S): comb[i, j] at i * S + j
    mixes = mix_ptr + rows * stride_mix
    pre = tl.load(mixes[:, None] + streams[None, :], mask=ok[:, None], other=0.0)  # (BT, S)
    post = tl.load(mixes[:, None] + S + streams[None, :], mask=ok[:, None], other=0.0)
    comb = tl.load(mixes[:, None, None] + 2 * S + cells[None, :, :], mask=ok[:, None, None], other=0.0)  # (BT, S, S)
    pre = tl.sigmoid(pre * tl.load(scale_ptr) + tl.load(base_ptr + streams)[None, :]) + hc_eps
    post = 2 * tl.sigmoid(post * tl.load(scale_ptr + 1) + tl.load(base_ptr + S + streams)[None, :])
    comb = comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * S + cells)[None, :, :]
    comb = tl.exp(comb - tl.max(comb, axis=2)[:, :, None])
    comb = comb / tl.sum(comb, axis=2)[:, :, None] + hc_eps  # softmax over each row, then + eps
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns first
    for _ in range(iterations - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)  # rows
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns
    tl.store(pre_ptr + rows[:, None] * S + streams[None, :], pre, mask=ok[:, None])
    tl.store(post_ptr + rows[:, None] * S + streams[None, :], post, mask=ok[:, None])
    tl.store(comb_ptr + rows[:, None, None] * (S * S) + cells[None, :, :], comb, mask=ok[:, None, None])


@triton.jit
def _collapse(weight_ptr, x_ptr, out_ptr, hidden, S: tl.constexpr, BD: tl.constexpr):
    token = tl.program_id(0)
    dims = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = dims < hidden
    acc = tl.zeros((BD,), dtype=tl.float32)
    for stream in tl.static_range(S):
        x = tl.load(x_ptr + (token * S + stream) * hidden + dims, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(weight_ptr + token * S + stream) * x
    tl.store(out_ptr + token * hidden + dims, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mix(x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, hidden, S: tl.constexpr, BD: tl.constexpr):
    token = tl.program_id(0)
    dims = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = dims < hidden
    outputs = tl.arange(0, S)
    y = tl.load(y_ptr + token * hidden + dims, mask=ok, other=0.0).to(tl.float32)  # (BD,)
    acc = tl.load(post_ptr + token * S + outputs)[:, None] * y[None, :]  # (S, BD)
    for stream in tl.static_range(S):
        x = tl.load(x_ptr + (token * S + stream) * hidden + dims, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(comb_ptr + token * S * S + stream * S + outputs)[:, None] * x[None, :]
    target = out_ptr + (token * S + outputs[:, None]) * hidden + dims[None, :]
    tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=ok[None, :])


@dataclass(frozen=True)
class MixesTiling:
    """How `stream_mixes` splits its work; bench/deepseek_v4_mhc.py times the tilings on a GPU.
    The field defaults are session 8's kernel (16 rows, float32 FMAs): 0.599 ms at 2048 tokens of
    the flash shape on an H100, 21.7x its memory floor. DEFAULT_MIXES_TILING (128 rows, 8 splits,
    tf32x3) took 0.097 ms there (3.5x the floor) with a smaller error against float32 torch
    (3.4e-7 against 4.5e-6 relative): docs/measurements/session10-H100-deepseek_v4_mhc.json."""

    rows: int = 16  # tokens a program
    splits: int = 1  # programs a row tile's columns are split over (> 1: partials, then a finishing sum)
    precision: str = "ieee"  # tl.dot: "ieee" float32 FMAs; "tf32x3" tensor cores, ~float32 (3 TF32 products)
    warps: int = 4


DEFAULT_MIXES_TILING = MixesTiling(rows=128, splits=8, precision="tf32x3", warps=8)
BLOCK_COLUMNS = 128  # columns of the flattened streams a loop step


def stream_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float,
                 tiling: MixesTiling = DEFAULT_MIXES_TILING) -> torch.Tensor:
    """streams (T, hc, hidden), fn (N, hc * hidden) float32 -> (T, N) float32."""
    x = streams.flatten(1)
    tokens, width = x.shape
    outputs = fn.shape[0]
    columns = max(16, triton.next_power_of_2(outputs))
    out = torch.empty(tokens, outputs, dtype=torch.float32, device=x.device)
    # Every split but the last covers a whole number of loop steps.
    split_width = triton.cdiv(triton.cdiv(width, tiling.splits), BLOCK_COLUMNS) * BLOCK_COLUMNS
    splits = triton.cdiv(width, split_width)
    grid = (triton.cdiv(tokens, tiling.rows), splits)
    if splits == 1:
        _stream_mixes[grid](x, fn, out, out, tokens, width, outputs, split_width, eps, x.stride(0), fn.stride(0),
                            out.stride(0), BT=tiling.rows, BK=BLOCK_COLUMNS, BN=columns, SPLIT=1,
                            PRECISION=tiling.precision, num_warps=tiling.warps)
        return out
    partials = torch.empty(splits, tokens, outputs, dtype=torch.float32, device=x.device)
    squares = torch.empty(splits, tokens, dtype=torch.float32, device=x.device)
    _stream_mixes[grid](x, fn, partials, squares, tokens, width, outputs, split_width, eps, x.stride(0),
                        fn.stride(0), outputs, BT=tiling.rows, BK=BLOCK_COLUMNS, BN=columns, SPLIT=splits,
                        PRECISION=tiling.precision, num_warps=tiling.warps)
    _finish_split_mixes[(triton.cdiv(tokens, 64),)](partials, squares, out, tokens, width, outputs, eps,
                                                    out.stride(0), SPLIT=splits, BT=64, BN=columns, num_warps=4)
    return out


def hyper_weights(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iterations: int,
                  hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes (T, (2 + hc) * hc) -> pre (T, hc), post (T, hc), comb (T, hc, hc), all float32."""
    tokens = mixes.shape[0]
    pre, post = (torch.empty(tokens, hc, dtype=torch.float32, device=mixes.device) for _ in range(2))
    comb = torch.empty(tokens, hc, hc, dtype=torch.float32, device=mixes.device)
    _hyper_weights[(triton.cdiv(tokens, 64),)](
        mixes, base, scale, pre, post, comb, tokens, mixes.stride(0), hc_eps, iterations, S=hc, BT=64, num_warps=4)
    return pre, post, comb


def collapse(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """weights (T, hc) float32, streams (T, hc, hidden) -> (T, hidden) in the streams' dtype."""
    tokens, hc, hidden = streams.shape
    out = streams.new_empty(tokens, hidden)
    _collapse[(tokens, triton.cdiv(hidden, BLOCK_HIDDEN))](
        weights.contiguous(), streams, out, hidden, S=hc, BD=BLOCK_HIDDEN, num_warps=4)
    return out


def mix(streams: torch.Tensor, block_output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """streams (T, hc, hidden), block_output (T, hidden), post (T, hc), comb (T, hc, hc) -> (T, hc, hidden)."""
    tokens, hc, hidden = streams.shape
    out = torch.empty_like(streams)
    _mix[(tokens, triton.cdiv(hidden, BLOCK_HIDDEN))](
        streams, block_output.contiguous(), post.contiguous(), comb.contiguous(), out, hidden, S=hc,
        BD=BLOCK_HIDDEN, num_warps=4)
    return out
