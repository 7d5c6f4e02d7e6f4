"""DeepSeek-V4's partial, interleaved RoPE, numerically as transformers' modeling_deepseek_v4.

Each head is laid out `[nope | rope]`: only the trailing `rotary_dim` channels rotate, and they
rotate in interleaved pairs (channels 2i, 2i+1 share frequency i), not in halves as in Llama.
cos/sin are computed in float32, cast to the model dtype, and the rotation itself runs in float32
before the result is cast back: transformers' order, so bf16 results round the same way.
"""

from __future__ import annotations

import torch

from model_folder.deepseek_v4_config import RopeSpec
from model_shards.rope import inv_freq_for


class InterleavedRotary:
    """cos/sin for arbitrary positions of one of V4's two rotary embeddings ("main", "compress")."""

    def __init__(self, spec: RopeSpec, max_position_embeddings: int, dtype: torch.dtype,
                 device: torch.device | str):
        inv_freq, self.attention_scaling = inv_freq_for(spec.theta, spec.rotary_dim, spec.scaling,
                                                        max_position_embeddings)
        self.inv_freq = inv_freq.to(device)  # (rotary_dim // 2,) float32
        self.dtype = dtype

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) long -> cos, sin (N, rotary_dim // 2) in the model dtype."""
        freqs = positions[:, None].float() * self.inv_freq  # (N, rotary_dim // 2) float32
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(self.dtype), sin.to(self.dtype)


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] channels of x (N, ..., D) by per-row cos/sin
    (N, rotary_dim // 2); the leading (nope) channels pass through. Pass -sin to undo a rotation
    (V4 does so on the attention output, see attention.py)."""
    rotary_dim = 2 * cos.shape[-1]
    broadcast = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(broadcast), sin.view(broadcast)  # (N, 1.., rotary_dim // 2)
    nope, rope = x[..., :-rotary_dim], x[..., -rotary_dim:]
    pairs = rope.float().unflatten(-1, (-1, 2))  # (N, .., rotary_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)
