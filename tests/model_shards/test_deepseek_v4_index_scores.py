"""The Lightning Indexer's fused score kernel (Triton; in its interpreter on a CPU) against the
float32 torch reference, and the one-topk earliest-first selection against the two-pass form it
replaced.

Kernel tolerance: half-precision inputs, float32 products and sums in both; they differ in summation order
over heads and dims only (~1e-6 relative on scores of ~1). -inf must match exactly: it decides
which entries a query may pick.
"""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.index_scores import index_scores_torch, index_scores_triton, ranking_keys
from model_shards.deepseek_v4.indexer import top_k_earliest_first, top_k_of_ranking

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's interpreter computes bf16 dots wrongly (numpy has no bf16): float16 there, bf16 on a GPU
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16


def two_pass_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The earlier form: the k-th value by topk, then the earliest of the tied by a cumsum."""
    kth = scores.topk(k, dim=-1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    chosen = above | (tied & (tied.cumsum(dim=-1) <= k - above.sum(dim=-1, keepdim=True)))
    entry = torch.arange(scores.shape[-1], 0, -1)
    return (chosen * entry).topk(k, dim=-1).indices.sort(dim=-1).values


def scoring_inputs(tokens: int, heads: int, dim: int, entries: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, dim, generator=generator).to(DEVICE, DTYPE)
    weights = torch.randn(tokens, heads, generator=generator).to(DEVICE) * 0.1
    keys = torch.randn(entries, dim, generator=generator).to(DEVICE, DTYPE)
    return q, weights, keys


@pytest.mark.parametrize("tokens, entries, first_position", [(70, 40, 90), (5, 130, 517), (33, 9, 0)])
def test_fused_scores_equal_the_torch_reference(tokens, entries, first_position):
    """Tiles of 16 x 16 over odd sizes: partial tiles, tiles wholly in the future (skipped), and
    rows that see no entry yet."""
    q, weights, keys = scoring_inputs(tokens, 4, 16, entries)
    expected = index_scores_torch(q, weights, keys, first_position, 4)
    fused = index_scores_triton(q, weights, keys, first_position, 4, block_tokens=16, block_entries=16)
    assert torch.equal(fused == float("-inf"), expected == float("-inf"))
    finite = expected > float("-inf")
    assert finite.any() and expected[finite].abs().max() > 0.1
    torch.testing.assert_close(fused[finite], expected[finite], atol=1e-5, rtol=1e-5)


def test_fused_ranking_keys_equal_the_encoded_scores():
    """Ranked in the kernel: the same keys as encoding its float scores, so the same picks; with
    4 heads of weights 0 or 1 whole rows tie at 0 (and -0.0)."""
    q, weights, keys = scoring_inputs(40, 4, 16, 60, seed=6)
    weights = (weights > 0).float() - (weights < -0.15).float()  # 1, 0, -1: exact 0 and -0.0 sums
    fused_scores = index_scores_triton(q, weights, keys, 200, 4, block_tokens=16, block_entries=16)
    ranked = index_scores_triton(q, weights, keys, 200, 4, block_tokens=16, block_entries=16, ranked=True)
    assert (fused_scores == 0).sum() > 10
    assert torch.equal(ranked, ranking_keys(fused_scores))
    assert torch.equal(top_k_of_ranking(ranked, 8), top_k_earliest_first(fused_scores, 8))


def test_one_topk_selects_as_the_two_pass_form():
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(-2, 3, (200, 50), generator=generator).float()  # ties everywhere
    scores[scores == -2] = float("-inf")
    scores[:, ::7] = -0.0  # equal to 0.0, and must tie with it
    for k in (1, 6, 25, 50):
        assert torch.equal(top_k_earliest_first(scores, k), two_pass_top_k(scores, k))


def test_scores_order_like_floats_across_signs():
    scores = torch.tensor([[-3.5, 2.0, -0.0, 1e-30, -1e-30, float("-inf"), 7.0, 0.0]])
    assert top_k_earliest_first(scores, 4).tolist() == [[1, 2, 3, 6]]  # 7, 2, 1e-30, then 0 before 0
