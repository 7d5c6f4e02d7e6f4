"""The elementwise work of a Llama-family layer as three fused kernels on a GPU, torch elsewhere.

In torch a layer's norms, residual adds, RoPE and SiLU are ~34 kernel launches (an RMS norm alone
is 8: a float32 copy, pow, mean, add, rsqrt, mul, a cast back, the weight's mul), each a full pass
over the activations. An eager step pays each launch in host time (~4-5 us; ~1,000 a step on a
32-layer model), and a long prefill pays each pass in memory traffic. Fused (layer_kernels_triton.py)
a layer runs four: two `add_rms_norm` (the residual add feeding the next norm, as vLLM fuses it),
one `rotate_queries_and_keys` (q and k of the fused qkv output) and one `silu_and_mul`.

    add_rms_norm(residual, delta)   residual + delta (the new residual stream), and its RMS norm
    rotate_queries_and_keys(qkv)    RoPE of q and k, read from q | k | v, written contiguous
    silu_and_mul(gate_up)           silu(gate) * up, from gate | up

The torch forms below are the reference and the CPU path: transformers' modeling_llama order, each
op rounding to the activations' dtype. The kernels round at the same places, so the two agree but
for the norm's float32 sum order. `fused` chooses per call: kernels on CUDA in a floating dtype the
kernels handle, the model built with fused kernels on (`model.fused_layer_kernels`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from model_shards.rope import apply_rotary

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_kernels_run(enabled: bool, *tensors: torch.Tensor) -> bool:
    """Whether the kernels take this call: on, every tensor on CUDA, contiguous, of one fused dtype,
    not empty (no zero-size grid), and Triton installed (a GPU without it runs the torch forms)."""
    first = tensors[0]
    return (enabled and first.is_cuda and first.dtype in FUSED_DTYPES and first.numel() > 0
            and all(t.is_contiguous() and t.dtype == first.dtype for t in tensors) and triton_installed())


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """residual, delta (T, hidden) -> (residual + delta, rms_norm(residual + delta)), each (T, hidden);
    no delta (the first layer): (residual, rms_norm(residual))."""
    parts = (residual, weight) if delta is None else (residual, delta, weight)
    if not fused_kernels_run(fused, *parts):
        return add_rms_norm_torch(residual, delta, weight, eps)
    return add_rms_norm_triton(residual, delta, weight, eps)


def add_rms_norm_triton(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from model_shards.layer_kernels_triton import launch_add_rms_norm

    summed = None if delta is None else torch.empty_like(residual)
    normed = torch.empty_like(residual)
    launch_add_rms_norm(residual, delta, weight, eps, summed, normed)
    return (residual if summed is None else summed), normed


def add_rms_norm_torch(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if delta is not None:
        residual = residual + delta
    return residual, rms_norm_torch(residual, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalize in float32, cast back, THEN scale in the model dtype: HF's order, which matters for
    # bf16/fp16 results
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)  # (T, 1)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_queries_and_keys(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            num_kv_heads: int, head_dim: int, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (T, (heads + 2 * kv_heads) * head_dim), cos / sin (T, head_dim // 2) in qkv's dtype ->
    rotated q (T, heads, head_dim), k (T, kv_heads, head_dim), both contiguous."""
    if not fused_kernels_run(fused, qkv, cos, sin):
        return rotate_queries_and_keys_torch(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return rotate_queries_and_keys_triton(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def rotate_queries_and_keys_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                                   num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    from model_shards.layer_kernels_triton import launch_rotate_queries_and_keys

    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    launch_rotate_queries_and_keys(qkv, cos, sin, q, k)
    return q, k


def rotate_queries_and_keys_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                                  num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = qkv.shape[0]
    q, k = qkv[:, :(num_heads + num_kv_heads) * head_dim].split([num_heads * head_dim, num_kv_heads * head_dim], -1)
    return (apply_rotary(q.reshape(tokens, num_heads, head_dim), cos, sin),
            apply_rotary(k.reshape(tokens, num_kv_heads, head_dim), cos, sin))


def silu_and_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    """gate_up (T, 2 * intermediate) -> silu(gate) * up (T, intermediate)."""
    if not fused_kernels_run(fused, gate_up):
        return silu_and_mul_torch(gate_up)
    return silu_and_mul_triton(gate_up)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    from model_shards.layer_kernels_triton import launch_silu_and_mul

    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    launch_silu_and_mul(gate_up, out)
    return out


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (T, intermediate) each
    return F.silu(gate) * up
