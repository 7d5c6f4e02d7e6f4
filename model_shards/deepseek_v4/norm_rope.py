"""RMS norm and V4's interleaved partial RoPE of one tensor, as one Triton kernel on a GPU.

The attention layer normalises and rotates q (T * heads rows of head_dim) and kv (T rows), and
un-rotates its output. In torch each is ~15 ops (float32 copies of the whole row for the norm, a
concatenation of the untouched nope channels with the rotated ones); here each is one pass:

    row factor    rsqrt(mean(x^2) + eps)                      float32
    norm          "none" | "unweighted": x * factor (factor rounded to x's dtype first, as
                  norms.unweighted_rms_norm) | "weighted": weight * (x * factor) (norms.RMSNorm)
    rope          the trailing 2 * cos.shape[-1] channels in (even, odd) pairs, rotated in float32
                  by the row's token's cos/sin (model dtype values), as rope.apply_interleaved_rotary

each rounding to x's dtype where torch's order does. With norm "none" the kernel rotates in place
and leaves the nope channels unread. Rows belong to token row // rows_per_token.
"""

from __future__ import annotations

import torch

from model_shards.deepseek_v4.norms import unweighted_rms_norm, weighted_rms_norm
from model_shards.deepseek_v4.rope import apply_interleaved_rotary

NORMS = {"none": 0, "unweighted": 1, "weighted": 2}


def norm_and_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: str, eps: float = 0.0,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, ..., D) -> rotated (and normed) x, (T, ..., D); norm "none" may rotate x in place."""
    if fused_kernel_runs(x):
        return norm_and_rotate_triton(x, cos, sin, norm, eps, weight)
    return norm_and_rotate_torch(x, cos, sin, norm, eps, weight)


def fused_kernel_runs(x: torch.Tensor) -> bool:
    return x.is_cuda and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def norm_and_rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: str, eps: float = 0.0,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    if norm == "unweighted":
        x = unweighted_rms_norm(x, eps)
    elif norm == "weighted":
        x = weighted_rms_norm(x, weight, eps)
    return apply_interleaved_rotary(x, cos, sin)


def norm_and_rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: str, eps: float = 0.0,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    from model_shards.deepseek_v4.norm_rope_kernel import launch_norm_rope

    dim, half = x.shape[-1], cos.shape[-1]
    rows = x.numel() // dim
    if cos.shape != sin.shape or cos.shape[0] != x.shape[0] or rows % x.shape[0] or 2 * half > dim:
        raise ValueError(f"norm_and_rotate: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)} disagree")
    out = x if norm == "none" else torch.empty_like(x)
    launch_norm_rope(x, cos.contiguous(), sin.contiguous(), out, weight, rows, rows // x.shape[0], dim, half,
                     NORMS[norm], eps)
    return out
