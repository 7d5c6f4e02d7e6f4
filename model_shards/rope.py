"""Rotary position embeddings, numerically as transformers computes them.

Each `_*_inv_freq` function repeats the arithmetic of the function of the same method in
transformers' `modeling_rope_utils.py` operation by operation (same dtypes, same order), so that
the float32 angles match bit for bit where the hardware allows.

Precision follows transformers' Llama: angles, cos and sin in float32, then cos/sin cast to the
model dtype and the rotation done in the model dtype (for bf16 that is bf16 arithmetic; rotating
in float32 instead would differ from HF by one bf16 rounding per element).

Dynamic NTK ("dynamic") semantics. transformers recomputes the base whenever a forward call sees
seq_len = max(position_ids) + 1 beyond what it has cached. We recompute it per sequence, per step,
from seq_len = max(max_position_embeddings, that sequence's context length after this step) and
rotate that step's new tokens with it; keys already in the cache keep the rotation they were
written with. This equals transformers when a fresh model generates one sequence (prefill, then one
token per step). Beyond max_position_embeddings a chunked prefill cannot equal an unchunked one:
earlier chunks' keys are rotated with a smaller base, which is inherent to the method.
"""

from __future__ import annotations

import math

import torch

from model_folder.hf_config import ModelArchitecture
from model_folder.rope_scaling import RopeScaling

_MIN_TABLE_ROWS = 256


class RotaryEmbedding:
    """cos/sin for the new tokens of one step, from a table cached over positions.

    The table holds half a head (cos of the angle for each frequency; transformers' full-width
    cos is that half repeated) in the model dtype, and doubles when a longer context appears:
    a 1M-token context costs one 1M-row table, never a recomputation per step.
    """

    def __init__(self, arch: ModelArchitecture, dtype: torch.dtype, device: torch.device | str):
        self.dtype = dtype
        self.device = torch.device(device)
        self.scaling = arch.rope_scaling
        self.rope_theta = arch.rope_theta
        self.head_dim = arch.head_dim
        self.max_position_embeddings = arch.max_position_embeddings
        inv_freq, self.attention_scaling = initial_inv_freq(arch)  # (head_dim // 2,) float32
        self.inv_freq = inv_freq.to(self.device)
        self._cos = torch.empty(0, self.head_dim // 2, dtype=dtype, device=self.device)
        self._sin = torch.empty_like(self._cos)

    @property
    def is_dynamic(self) -> bool:
        return self.scaling is not None and self.scaling.rope_type == "dynamic"

    def cos_sin(self, positions: torch.Tensor, query_start_loc: list[int],
                context_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, head_dim // 2) in the model dtype, for the flattened batch's
        new tokens. Host-side lengths size the table, so no device sync reads `positions`."""
        longest = max(context_lens, default=0)
        if not self.is_dynamic or longest <= self.max_position_embeddings:
            self._ensure_rows(longest)
            return self._cos[positions], self._sin[positions]  # (T, head_dim // 2) each
        return self._dynamic_cos_sin(positions, query_start_loc, context_lens)

    def _ensure_rows(self, rows: int) -> None:
        if rows <= self._cos.shape[0]:
            return
        capacity = max(_MIN_TABLE_ROWS, 1 << (rows - 1).bit_length())
        all_positions = torch.arange(capacity, device=self.device)
        self._cos, self._sin = self._compute(all_positions, self.inv_freq)

    def _compute(self, positions: torch.Tensor,
                 inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * inv_freq[None, :]  # (P, head_dim // 2) float32
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    def _dynamic_cos_sin(self, positions: torch.Tensor, query_start_loc: list[int],
                         context_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the table while its context fits the original length, else a base
        stretched for its own length (see the module docstring)."""
        self._ensure_rows(min(max(context_lens), self.max_position_embeddings))
        cos_parts, sin_parts = [], []
        for i, context_len in enumerate(context_lens):
            rows = positions[query_start_loc[i]:query_start_loc[i + 1]]  # (n_i,)
            if context_len <= self.max_position_embeddings:
                cos, sin = self._cos[rows], self._sin[rows]
            else:
                inv_freq = _dynamic_inv_freq(self.rope_theta, self.head_dim, self.scaling.factor,
                                             self.max_position_embeddings, context_len)
                cos, sin = self._compute(rows, inv_freq.to(self.device))
            cos_parts.append(cos)
            sin_parts.append(sin)
        return torch.cat(cos_parts), torch.cat(sin_parts)  # (T, head_dim // 2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by per-token cos/sin (T, head_dim // 2), all in x's dtype.

    Elementwise this is transformers' `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`:
    the same products and sums, each rounded once.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (T, heads, head_dim // 2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim // 2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (T, heads, head_dim)


def initial_inv_freq(arch: ModelArchitecture) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim // 2,) float32 on CPU, attention scaling) as transformers builds
    them at model construction."""
    return inv_freq_for(arch.rope_theta, arch.head_dim, arch.rope_scaling, arch.max_position_embeddings)


def inv_freq_for(theta: float, dim: int, scaling: RopeScaling | None,
                 max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim // 2,) float32 on CPU, attention scaling) for `dim` rotated channels."""
    if scaling is None:
        return _default_inv_freq(theta, dim), 1.0
    if scaling.rope_type == "linear":
        return _default_inv_freq(theta, dim) / scaling.factor, 1.0
    if scaling.rope_type == "dynamic":
        return _dynamic_inv_freq(theta, dim, scaling.factor, max_position_embeddings, None), 1.0
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(theta, dim, scaling), _yarn_attention_factor(scaling)
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(theta, dim, scaling), 1.0
    raise ValueError(f"unknown rope_type {scaling.rope_type!r}")


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _dynamic_inv_freq(theta: float, dim: int, factor: float, max_positions: int,
                      seq_len: int | None) -> torch.Tensor:
    """At construction transformers passes no seq_len (Python float arithmetic); in the forward
    pass a 0-d int64 tensor, which turns the base arithmetic into float32. Both are kept."""
    if seq_len is None:
        length: int | torch.Tensor = max_positions
    else:
        length = torch.maximum(torch.tensor(seq_len), torch.tensor(max_positions))
    base = theta * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(scaling: RopeScaling) -> float:
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return float(_yarn_mscale(scaling.factor, scaling.mscale)
                     / _yarn_mscale(scaling.factor, scaling.mscale_all_dim))
    return _yarn_mscale(scaling.factor)


def _yarn_correction_range(scaling: RopeScaling, dim: int, theta: float) -> tuple[float, float]:
    """Dimension range that blends interpolation into extrapolation (the paper's ramp)."""
    def correction_dim(num_rotations: float) -> float:
        original = scaling.original_max_position_embeddings
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = correction_dim(scaling.beta_fast or 32)
    high = correction_dim(scaling.beta_slow or 1)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_inv_freq(theta: float, dim: int, scaling: RopeScaling) -> torch.Tensor:
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # (dim // 2,)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (scaling.factor * pos_freqs)
    low, high = _yarn_correction_range(scaling, dim, theta)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return (inv_freq_interpolation * (1 - extrapolation_weight)
            + inv_freq_extrapolation * extrapolation_weight)


def _llama3_inv_freq(theta: float, dim: int, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short kept, a smooth blend in between."""
    inv_freq = _default_inv_freq(theta, dim)
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)
