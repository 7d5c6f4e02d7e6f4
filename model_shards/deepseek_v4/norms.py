"""V4's RMS norms, in transformers' order of operations.

Unlike Llama's, the weighted norm scales in float32 and casts last (`(weight * x32).to(dtype)`),
and its weight stays float32 in a bf16 model (transformers keeps every V4 norm in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from model_shards.deepseek_v4.weights import CheckpointTensors


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_rms_norm(x, self.weight, self.eps)

    def load(self, reader: CheckpointTensors, name: str) -> None:
        reader.copy_into(self.weight.data, name)


def weighted_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim; the rms in float32, the product in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
