"""The exact log-sum-exp merges: however the keys are split and in whatever order the partials
arrive (first partial of a row copied, later ones merged in place; rows no partial reached), the
merge equals attention over all keys at once, in float64 to 1e-12."""

from __future__ import annotations

import math

import torch

from model_shards.parallel.lse_attention import PartialSum, merge_outputs, merge_stacked, reference_attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def random(rows: int, heads: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, heads, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_partial_sum_over_split_keys_and_uneven_row_ranges_equals_full_attention():
    q, k, v = random(10, HEADS, 1), random(12, KV_HEADS, 2), random(12, KV_HEADS, 3)
    expected_out, expected_lse = reference_attention(q, k, v, 0.3, False)
    partial = PartialSum(12, HEADS, HEAD_DIM, q.device, torch.float64)  # rows 10, 11: no partial
    # rows 3..6 first (a gap before it), then 0..10 straddling it, then a third key range on 2..8
    for rows, keys in (((3, 7), (0, 5)), ((0, 10), (5, 9)), ((0, 3), (0, 5)), ((7, 10), (0, 5)),
                       ((2, 9), (9, 12)), ((0, 2), (9, 12)), ((9, 10), (9, 12))):
        out, lse = reference_attention(q[rows[0]:rows[1]], k[keys[0]:keys[1]], v[keys[0]:keys[1]], 0.3, False)
        partial.add(rows[0], out, lse)
    assert torch.allclose(partial.out[:10], expected_out, atol=1e-12)
    assert torch.allclose(partial.lse[:10], expected_lse, atol=1e-12)
    assert partial.out[10:].abs().max() == 0 and torch.isneginf(partial.lse[10:]).all()


def test_merging_rank_partials_equals_full_attention_and_empty_rows_give_zero():
    q, k, v = random(3, HEADS, 4), random(9, KV_HEADS, 5), random(9, KV_HEADS, 6)
    expected_out, expected_lse = reference_attention(q, k, v, 0.5, False)
    splits = [(0, 4), (4, 4), (4, 9)]  # the middle rank holds no key of this sequence
    parts = [reference_attention(q, k[a:b], v[a:b], 0.5, False) for a, b in splits]
    outs, lses = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])  # (3, n, H, D), (3, n, H)
    out, lse = merge_stacked(outs, lses)
    assert torch.allclose(out, expected_out, atol=1e-12) and torch.allclose(lse, expected_lse, atol=1e-12)
    assert torch.equal(merge_outputs(outs, lses), out)
    nothing = merge_outputs(outs[1:2], lses[1:2])  # no partial saw a key: out 0, not NaN
    assert nothing.abs().max() == 0 and torch.isneginf(lses[1]).all() and not math.isnan(nothing.sum())
