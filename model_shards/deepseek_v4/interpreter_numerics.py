"""Triton's interpreter made to compute bf16 as the GPU does, for CPU runs of the bf16 kernels.

The interpreter (TRITON_INTERPRET=1, numpy) keeps bf16 tensors as their uint16 bit patterns, since
numpy has no bf16, and two of its operations then differ from the GPU:
- `tl.dot` on bf16 operands multiplies the bit patterns as integers (garbage);
- a float32 -> bf16 cast truncates the mantissa, where the GPU's cvt.rn (and torch) rounds to
  nearest, ties to even.
`gpu_bf16_numerics()` replaces both for its duration: bf16 dot operands are widened to float32
and multiplied by numpy in float32 (the products of two bf16 values are exact in float32, so this
is what a float32-accumulating tensor core computes, up to summation order), and the cast rounds
through torch. Kernel code stays the code the GPU runs; nothing changes where Triton compiles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from model_shards.attention.triton_runtime import tl


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(values))


@contextlib.contextmanager
def gpu_bf16_numerics() -> Iterator[None]:
    """Within: interpreted kernels dot and round bf16 like the GPU. A no-op when Triton compiles."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original_dot, original_cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(_bf16_bits_to_float32(a.data), _bf16_bits_to_float32(b.data), dtype=np.float32)
        return TensorHandle(product + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_float32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = original_dot, original_cast
