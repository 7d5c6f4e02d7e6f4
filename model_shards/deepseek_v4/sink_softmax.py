"""The softmax of sink_attention (one row per query and head over its window keys, its compressed
keys and the head's sink logit) as one Triton kernel on a GPU, in place on the logits.

In torch the row passes through ~8 float32 tensors the size of the logits (scale, mask bias,
concatenation with the sink, max, subtraction, softmax, cast, per-group slices): memory-bound, the
largest part of the attention core. Here each logit is read twice (max and sum, then the
probabilities) and written once, and masks are read as one byte per (query, key), shared by heads.

Numerics follow transformers' eager attention: logit = (q . k) rounded to the logits' dtype, times
the scale rounded again, -inf where masked; the sink joins the softmax in float32; probabilities
round to the logits' dtype. Only the softmax's float32 summation order differs.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton

# Keys a program handles per step, for every row: a row's keys in one or a few wide steps. One size,
# not the row's next power of two: each new block size is a new compile, and HCA rows grow with the
# context (a long prompt compiled 256 .. 2048 one after another, mid-request). Lanes past a short
# row's end are masked: they load nothing.
BLOCK_KEYS = 2048


@triton.jit
def _sink_softmax(first_ptr, first_allowed_ptr, second_ptr, second_allowed_ptr, sink_ptr, heads, first_keys,
                  second_keys, scale, BK: tl.constexpr):
    row = tl.program_id(0)  # query * heads + head
    query, head = row // heads, row % heads
    peak = tl.load(sink_ptr + head).to(tl.float32)
    total = peak * 0.0 + 1.0  # the sink's exp(sink - peak)
    cols = tl.arange(0, BK)
    for start in range(0, first_keys + second_keys, BK):  # pass 1: running max and sum
        logit = _scaled(first_ptr, first_allowed_ptr, second_ptr, second_allowed_ptr, row, query, start + cols,
                        first_keys, second_keys, scale)
        new_peak = tl.maximum(peak, tl.max(logit, axis=0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(logit - new_peak), axis=0)
        peak = new_peak
    for start in range(0, first_keys + second_keys, BK):  # pass 2: probabilities, in place
        key = start + cols
        logit = _scaled(first_ptr, first_allowed_ptr, second_ptr, second_allowed_ptr, row, query, key,
                        first_keys, second_keys, scale)
        probability = (tl.exp(logit - peak) / total).to(first_ptr.dtype.element_ty)
        tl.store(first_ptr + row * first_keys + key, probability, mask=key < first_keys)
        tl.store(second_ptr + row * second_keys + key - first_keys, probability,
                 mask=(key >= first_keys) & (key < first_keys + second_keys))


@triton.jit
def _scaled(first_ptr, first_allowed_ptr, second_ptr, second_allowed_ptr, row, query, key, first_keys, second_keys,
            scale):
    """Logits of keys `key` of one row (the two groups side by side), scaled, -inf where masked or past the end."""
    in_first, in_second = key < first_keys, (key >= first_keys) & (key < first_keys + second_keys)
    logit = tl.load(first_ptr + row * first_keys + key, mask=in_first, other=0.0)
    logit = tl.where(in_first, logit, tl.load(second_ptr + row * second_keys + key - first_keys, mask=in_second,
                                              other=0.0))
    allowed = tl.load(first_allowed_ptr + query * first_keys + key, mask=in_first, other=0) != 0
    allowed = tl.where(in_first, allowed,
                       tl.load(second_allowed_ptr + query * second_keys + key - first_keys, mask=in_second, other=0) != 0)
    scaled = (logit.to(tl.float32) * scale).to(first_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(allowed & (in_first | in_second), scaled, float("-inf"))


def sink_softmax_(logits: list[torch.Tensor], allowed: list[torch.Tensor], sinks: torch.Tensor,
                  scale: float) -> list[torch.Tensor]:
    """logits: one or two (t, heads, K_g) tensors of raw q . k, allowed: (t, K_g) bool each ->
    the same tensors, overwritten with the probabilities (the sink's share left out)."""
    if len(logits) not in (1, 2) or len(allowed) != len(logits):
        raise ValueError("sink_softmax_: one or two key groups")
    tokens, heads, _ = logits[0].shape
    for group, mask in zip(logits, allowed):
        if group.shape[:2] != (tokens, heads) or mask.shape != (tokens, group.shape[2]) or not group.is_contiguous():
            raise ValueError(f"sink_softmax_: logits {tuple(group.shape)} and mask {tuple(mask.shape)} disagree")
    first, second = logits[0], logits[-1] if len(logits) == 2 else logits[0][:, :, :0]
    first_allowed = allowed[0].contiguous().view(torch.uint8)
    second_allowed = allowed[-1].contiguous().view(torch.uint8) if len(logits) == 2 else first_allowed
    if tokens * heads:
        _sink_softmax[(tokens * heads,)](
            first, first_allowed, second, second_allowed, sinks.float().contiguous(), heads, first.shape[2],
            second.shape[2], scale, BK=BLOCK_KEYS, num_warps=8)
    return logits
