"""Attention that also returns each query's log-sum-exp, and the exact merge of such partials.

Sequence parallelism splits the keys a query sees over ring steps and cache shards. Each piece
gives a partial (out_i, lse_i) with out_i = softmax over its keys only; over disjoint key sets

    lse = log(sum_i exp(lse_i)),   out = sum_i exp(lse_i - lse) * out_i

is exactly full attention (the same identity flash attention uses between its tiles), so the
split changes only float rounding, never the result.

Kernels share one signature: q (n, H, D), k/v (m, KV, D) with H a multiple of KV (GQA) ->
(out (n, H, D) in q's dtype, lse (n, H) float32 or float64). `causal` is bottom-right aligned
(query j is position m - n + j), and is only used with n == m here. The plain-torch reference
runs anywhere (CPU tests, float64); on CUDA the flash or cuDNN kernels of torch's SDPA are
used when a probe against the reference passes (`select_kernel`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor]]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float32 (float64 for float64 inputs); a query with no key gets out 0, lse -inf."""
    n, heads, head_dim = q.shape
    m, kv_heads, _ = k.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    grouped = q.to(compute).view(n, kv_heads, heads // kv_heads, head_dim)  # head h uses KV head h // group
    scores = torch.einsum("nkgd,mkd->kgnm", grouped, k.to(compute)) * scale  # (KV, G, n, m)
    if causal:
        visible = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)  # (n, m)
        scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (KV, G, n)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # all -inf rows: -inf - -inf
    out = torch.einsum("kgnm,mkd->nkgd", probs, v.to(compute)).reshape(n, heads, head_dim)
    return out.to(q.dtype), lse.reshape(heads, n).transpose(0, 1)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # (L, H, D) -> (1, H, L, D), a view


def _expand_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1) if k.shape[1] != heads else k


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 through torch's SDPA op; GQA natively (no copy of K/V)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhld(q), _bhld(k), _bhld(v), 0.0, causal, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)  # (n, H, D), (n, H)


def flash_attention_expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As flash_attention, with K/V copied up to the query heads (if the op rejects GQA)."""
    heads = q.shape[1]
    return flash_attention(q, _expand_heads(k, heads), _expand_heads(v, heads), scale, causal)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention through torch's SDPA op (GQA passed through as is)."""
    heads, n = q.shape[1], q.shape[0]
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhld(q), _bhld(k), _bhld(v), None, True, 0.0, causal, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse.reshape(heads, n).transpose(0, 1)  # lse may come as (1, H, n, 1)


def cudnn_attention_expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    heads = q.shape[1]
    return cudnn_attention(q, _expand_heads(k, heads), _expand_heads(v, heads), scale, causal)


KERNELS: dict[str, LseKernel] = {
    "reference": reference_attention,
    "cudnn": cudnn_attention,
    "flash": flash_attention,
    "cudnn_expanded": cudnn_attention_expanded,
    "flash_expanded": flash_attention_expanded,
}
# Prefill (many queries): cuDNN first, on Hopper the fastest causal bf16 kernel torch ships
# (FlashAttention-2 is an Ampere design). Decode (one query over a long context): FlashAttention-2
# first, which splits the keys over SMs and folds GQA groups into query rows; a kernel that
# parallelizes over query tiles only would run one CTA per head. The expanded variants copy K/V
# up to the query heads, so they come last.
PREFILL_PREFERENCE = ("cudnn", "flash", "cudnn_expanded", "flash_expanded")
DECODE_PREFERENCE = ("flash", "flash_expanded", "cudnn", "cudnn_expanded")


def attention_with_lse(kernel: LseKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel`, with the empty cases (no query, no key) answered here: fused kernels reject them."""
    n, heads, _ = q.shape
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if n == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((n, heads), -math.inf, dtype=lse_dtype, device=q.device)
    return kernel(q, k, v, scale, causal)


def select_kernel(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                  preference: tuple[str, ...] = PREFILL_PREFERENCE) -> tuple[str, LseKernel]:
    """The first CUDA kernel in `preference` whose (out, lse) match the reference on a small probe
    of this model's head shape, else the reference (CPU, float32 on GPU, or a torch without them)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "reference", reference_attention
    for name in preference:
        if kernel_matches_reference(KERNELS[name], device, dtype, heads, kv_heads, head_dim):
            return name, KERNELS[name]
    return "reference", reference_attention


def kernel_matches_reference(kernel: LseKernel, device: torch.device, dtype: torch.dtype, heads: int,
                             kv_heads: int, head_dim: int) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(96, h, head_dim, device=device, dtype=dtype, generator=generator)
               for h in (heads, kv_heads, kv_heads))
    try:
        for causal in (True, False):
            out, lse = kernel(q, k, v, head_dim ** -0.5, causal)
            ref_out, ref_lse = reference_attention(q, k, v, head_dim ** -0.5, causal)
            # bf16 inputs: a correct kernel is within a few bf16 ulps; a wrong mask or head
            # mapping is off by O(1)
            if (out.float() - ref_out.float()).abs().max() > 0.05 or (lse - ref_lse).abs().max() > 0.05:
                return False
    except (RuntimeError, TypeError, AttributeError):  # the op is missing or rejects this shape
        return False
    return True


class PartialSum:
    """Running exact combination of partial attentions of `rows` queries, over disjoint keys.

    At a million tokens `out` is gigabytes, so each row range is written once by the first partial
    that reaches it (a copy: no zero fill, no rescale of zeros) and merged in place by later ones;
    rows that no partial reached read as out 0, lse -inf."""

    def __init__(self, rows: int, heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self._out = torch.empty(rows, heads, head_dim, dtype=dtype, device=device)  # (rows, H, D)
        self._lse = torch.empty(rows, heads, dtype=dtype, device=device)  # (rows, H)
        self._filled = 0  # rows [0, _filled) hold a partial (or were set empty)

    @property
    def out(self) -> torch.Tensor:
        self._set_empty_through(self._out.shape[0])
        return self._out

    @property
    def lse(self) -> torch.Tensor:
        self._set_empty_through(self._out.shape[0])
        return self._lse

    def add(self, start: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a partial for rows start .. start + len(out), in place."""
        stop = start + out.shape[0]
        if stop == start:
            return
        self._set_empty_through(start)
        seen = min(max(self._filled, start), stop)  # rows [start, seen) hold partials, [seen, stop) are new
        if seen > start:
            self._merge(start, out[:seen - start], lse[:seen - start])
        if stop > seen:
            self._out[seen:stop].copy_(out[seen - start:])
            self._lse[seen:stop].copy_(lse[seen - start:])
            self._filled = stop

    def _merge(self, start: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        acc_out, acc_lse = self._out[start:start + out.shape[0]], self._lse[start:start + out.shape[0]]
        merged = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))  # (n, H)
        finite = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)  # both empty: 0 weights
        acc_out.mul_(torch.exp(acc_lse - finite)[..., None])
        acc_out.addcmul_(out, torch.exp(lse - finite)[..., None])
        acc_lse.copy_(merged)

    def _set_empty_through(self, row: int) -> None:
        if row > self._filled:
            self._out[self._filled:row].zero_()
            self._lse[self._filled:row].fill_(-math.inf)
            self._filled = row


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials of the same rows from several ranks: outs (N, n, H, D), lses (N, n, H) -> merged."""
    return merge_outputs(outs, lses), torch.logsumexp(lses, dim=0)


def merge_outputs(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """The merged output alone (a decode step needs no merged lse), in four kernels: partial i's
    weight exp(lse_i - lse) is a softmax over the partials of their lse."""
    weights = torch.softmax(lses, dim=0).nan_to_num_(0.0)  # (N, n, H); a row no partial saw: NaN -> 0
    return (outs * weights[..., None]).sum(dim=0)  # (n, H, D)
