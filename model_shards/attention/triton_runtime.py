"""Triton for the kernel modules, in its interpreter where there is no CUDA.

Without CUDA the interpreter (TRITON_INTERPRET=1, numpy on the CPU) is the only way a Triton
kernel runs: CPU tests use it to check the kernels against their torch references. Triton reads
the choice when it defines a kernel, its own library's included, so it must come before anything
imports Triton: tests/conftest.py sets it first for the tests, this module for other CPU uses.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the interpreter choice above)
import triton.language as tl  # noqa: E402

__all__ = ["tl", "triton"]
