"""The Triton kernels of model_shards/layer_kernels.py (what and why there): residual add + RMS norm,
RoPE of the queries and keys, SiLU-and-multiply. Each computes in float32 and rounds to the
activations' dtype exactly where torch's ops of the reference form round (one rounding per torch
op), so the fused and unfused layers agree to the last bit but for the norm's float32 sum order.

Token counts vary step to step: each is a grid size or `do_not_specialize`, so a kernel compiles
once per dtype and model shape, at start-up (DecoderLayer.warm_up_fused_kernels), never inside a
request. Offsets are int64: a step of a million tokens times 8K channels passes 2**31 elements.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton


@triton.jit(do_not_specialize=["rows"])
def _add_rms_norm(residual_ptr, delta_ptr, weight_ptr, sum_ptr, normed_ptr, rows, dim, eps,
                  HAS_DELTA: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (row < rows)[:, None] & (cols < dim)[None, :]
    at = row[:, None] * dim + cols[None, :]  # (BR, BD)
    x = tl.load(residual_ptr + at, mask=mask, other=0.0)
    if HAS_DELTA:  # residual + delta, rounded as torch's add rounds; the new residual stream
        x = (x.to(tl.float32) + tl.load(delta_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + at, x, mask=mask)
    x = x.to(tl.float32)
    factor = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)  # (BR,)
    normed = (x * factor[:, None]).to(normed_ptr.dtype.element_ty).to(tl.float32)  # HF: cast, THEN scale
    weight = tl.load(weight_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    tl.store(normed_ptr + at, (weight[None, :] * normed).to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_queries_and_keys(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, num_heads, num_kv_heads, half,
                             BHEADS: tl.constexpr, BH: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BHEADS + tl.arange(0, BHEADS)  # q heads, then k heads
    pair = tl.arange(0, BH)
    head_dim = 2 * half
    pair_ok = (pair < half)[None, :]
    row_width = (num_heads + 2 * num_kv_heads) * head_dim  # q | k | v of one token
    first_half = token * row_width + head[:, None] * head_dim + pair[None, :]  # (BHEADS, BH)
    mask = (head < num_heads + num_kv_heads)[:, None] & pair_ok
    x1 = tl.load(qkv_ptr + first_half, mask=mask, other=0.0)
    x2 = tl.load(qkv_ptr + first_half + half, mask=mask, other=0.0)
    cos = tl.load(cos_ptr + token * half + pair, mask=pair < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * half + pair, mask=pair < half, other=0.0).to(tl.float32)[None, :]
    x1, x2, dtype_of = x1.to(tl.float32), x2.to(tl.float32), x1
    # rope.apply_rotary's x1 * cos - x2 * sin and x2 * cos + x1 * sin: each product and sum rounded
    first = _round(_round(x1 * cos, dtype_of) - _round(x2 * sin, dtype_of), dtype_of)
    second = _round(_round(x2 * cos, dtype_of) + _round(x1 * sin, dtype_of), dtype_of)
    is_query = (head < num_heads)[:, None]
    q_at = token * num_heads * head_dim + head[:, None] * head_dim + pair[None, :]
    k_at = token * num_kv_heads * head_dim + (head[:, None] - num_heads) * head_dim + pair[None, :]
    first, second = first.to(q_ptr.dtype.element_ty), second.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + q_at, first, mask=mask & is_query)
    tl.store(q_ptr + q_at + half, second, mask=mask & is_query)
    tl.store(k_ptr + k_at, first, mask=mask & ~is_query)
    tl.store(k_ptr + k_at + half, second, mask=mask & ~is_query)


@triton.jit
def _round(value, like):
    """A float32 value rounded to `like`'s dtype and back: what one torch op in that dtype keeps."""
    return value.to(like.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul(gate_up_ptr, out_ptr, intermediate, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + token * 2 * intermediate + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + token * 2 * intermediate + intermediate + cols, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    silu = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype)  # F.silu's result, rounded
    tl.store(out_ptr + token * intermediate + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def launch_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        summed: torch.Tensor | None, normed: torch.Tensor) -> None:
    rows, dim = residual.shape
    block = triton.next_power_of_2(dim)
    block_rows = max(1, min(16, 2048 // block))  # a row per program from 2K channels up
    _add_rms_norm[(triton.cdiv(rows, block_rows),)](
        residual, delta if delta is not None else residual, weight, summed if summed is not None else normed,
        normed, rows, dim, eps, HAS_DELTA=delta is not None, BR=block_rows, BD=block,
        num_warps=min(16, max(4, block // 512)))  # at most ~32 channels a thread: no register spills


def launch_rotate_queries_and_keys(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
                                   k: torch.Tensor) -> None:
    tokens, num_heads, head_dim = q.shape
    num_kv_heads, half = k.shape[1], head_dim // 2
    block_heads = 8  # 8 x 64 pairs of a 128-dim head: a 1 KiB tile of each half a program
    grid = (tokens, triton.cdiv(num_heads + num_kv_heads, block_heads))
    # No FP fusion: the compiler would turn round(x1 * cos) - round(x2 * sin) into one bf16 FMA,
    # dropping a rounding torch's ops make (session 19's H100 run: the GPU test failed in bf16; the
    # PTX had fma.rn.bf16, test_layer_kernels_compile.py now reads it).
    _rotate_queries_and_keys[grid](qkv, cos, sin, q, k, num_heads, num_kv_heads, half,
                                   BHEADS=block_heads, BH=triton.next_power_of_2(half), num_warps=4,
                                   enable_fp_fusion=False)


def launch_silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    tokens, intermediate = out.shape
    block = min(1024, triton.next_power_of_2(intermediate))
    _silu_and_mul[(tokens, triton.cdiv(intermediate, block))](gate_up, out, intermediate, BLOCK=block,
                                                              num_warps=4)
