"""top_k_by_threshold (model_shards/deepseek_v4/threshold_top_k.py) picks exactly what the indexer's
int64 ranking picks (indexer.top_k_of_ranking over index_scores.ranking_keys): the same entries in
the same ascending order, with the ties ReLU makes (many exact zeros), -0.0 against 0.0, rows of
-inf (entries not closed yet) and k from 1 to E; its row pass as torch ops and as the Triton kernel
(the interpreter on a CPU), rows longer than a tile included. Exact equality: both are selections."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.index_scores import ranking_keys
from model_shards.deepseek_v4.indexer import top_k_of_ranking
from model_shards.deepseek_v4.threshold_top_k import (chosen_columns_kernel, chosen_columns_torch, kth_by_radix,
                                                      kth_by_topk, top_k_by_threshold)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def relu_like_scores(rows: int, entries: int, seed: int) -> torch.Tensor:
    """Weighted sums of ReLUs as the indexer makes them: many exact zeros, a few repeated values,
    -inf past each row's closed entries (a causal chunk), one -0.0."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, entries, generator=generator).clamp(min=0)  # about half exactly 0
    scores = torch.where(torch.rand(rows, entries, generator=generator) < 0.1, 0.5, scores)  # ties above 0
    closed = torch.randint(entries // 4, entries + 1, (rows, 1), generator=generator)
    scores = scores.masked_fill(torch.arange(entries) >= closed, float("-inf"))
    scores[0, 1] = -0.0
    return scores.to(DEVICE)


@pytest.mark.parametrize("rows, entries, k", [(7, 50, 1), (7, 50, 13), (16, 300, 64), (5, 40, 40), (9, 600, 512)])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_top_k_equals_the_int64_ranking(rows, entries, k, seed):
    scores = relu_like_scores(rows, entries, seed)
    expected = top_k_of_ranking(ranking_keys(scores), k)
    assert torch.equal(top_k_by_threshold(scores, k), expected)


@pytest.mark.parametrize("rows, entries, k", [(7, 50, 13), (3, 9000, 512), (5, 40, 40)])  # 9000: several tiles
def test_the_radix_select_finds_the_topks_kth_value_and_its_ties(rows, entries, k):
    """Ties included: (5, 40, 40) asks for every entry, its k-th the row's least (-inf)."""
    scores = relu_like_scores(rows, entries, seed=rows + 10)
    kth, wanted = kth_by_radix(scores, k)
    expected_kth, expected_wanted = kth_by_topk(scores, k)
    assert torch.equal(kth, expected_kth) and torch.equal(wanted, expected_wanted)
    assert torch.equal(top_k_by_threshold(scores, k, "radix"), top_k_of_ranking(ranking_keys(scores), k))


def test_the_radix_select_orders_negative_scores_and_signed_zeros():
    scores = torch.tensor([[-1.5, -0.0, 0.0, -3.0, 2.0, -0.25, float("-inf"), 0.0]], device=DEVICE)
    for k, (value, ties) in {1: (2.0, 1), 2: (0.0, 1), 4: (0.0, 3), 5: (-0.25, 1), 6: (-1.5, 1),
                             8: (float("-inf"), 1)}.items():
        kth, wanted = kth_by_radix(scores, k)
        assert (kth.item(), wanted.item()) == (value, ties), k


@pytest.mark.parametrize("rows, entries, k", [(7, 50, 13), (3, 9000, 512), (4, 40, 40)])  # 9000: several tiles
def test_the_row_pass_kernel_equals_the_torch_ops(rows, entries, k):
    scores = relu_like_scores(rows, entries, seed=rows)
    values = scores.topk(k, dim=-1, sorted=False).values
    kth = values.amin(dim=-1)
    wanted = k - (values > kth[:, None]).sum(dim=-1, dtype=torch.int32)
    expected = top_k_of_ranking(ranking_keys(scores), k)
    assert torch.equal(chosen_columns_torch(scores, kth, wanted, k), expected)
    assert torch.equal(chosen_columns_kernel(scores, kth, wanted, k), expected)


def test_rows_of_all_ties_choose_the_earliest_entries():
    scores = torch.zeros(3, 20, device=DEVICE)
    scores[1, 15:] = float("-inf")  # 15 closed entries, all tied at 0
    scores[2, 7] = 1.0  # one above, the rest tied
    expected = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 7]], device=DEVICE)
    assert torch.equal(top_k_by_threshold(scores, 5), expected)
    assert torch.equal(top_k_of_ranking(ranking_keys(scores), 5), expected)


def test_one_compiled_variant_serves_every_row_width():
    """Entry counts grow with the prompt (1, multiples of 16 and neither): both kernels keep one
    launch key, so none compiles inside a request (triton_compiles.LaunchKeys)."""
    from model_shards.deepseek_v4.threshold_top_k import _chosen_columns, _kth_largest
    from model_shards.triton_compiles import LaunchKeys

    with LaunchKeys(_chosen_columns, _kth_largest) as launched:
        for entries in (17, 32, 33, 48, 129):
            scores = relu_like_scores(3, entries, seed=entries)
            kth, wanted = kth_by_radix(scores, 16)
            chosen_columns_kernel(scores, kth, wanted, 16)
    assert all(len(set(keys)) == 1 and len(keys) == 5 for keys in launched.keys.values()), launched.keys


def test_no_choice_is_an_empty_block():
    assert top_k_by_threshold(torch.zeros(4, 9, device=DEVICE), 0).shape == (4, 0)


def test_the_tiny_model_with_threshold_top_k_gives_the_ranked_models_logits(tmp_path, monkeypatch):
    """model.deepseek_v4_index_top_k threshold through the layers: with 4 indexer heads whole groups
    of entries score exactly 0 at the top-k boundary, yet the chunked prefill's logits are the
    ranked model's bit for bit (the same entries chosen), and every CSA chunk ran the threshold."""
    from model_shards.deepseek_v4 import indexer
    from model_shards.deepseek_v4.kernel_choices import KernelChoices
    from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
    from model_shards.deepseek_v4.presets import make_deepseek_v4_model

    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=0, index_n_heads=4)
    ids = torch.randint(0, 1000, (150,), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(indexer, "top_k_by_threshold", lambda *args: calls.append(1) or top_k_by_threshold(*args))

    def logits(method: str) -> torch.Tensor:
        model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32, kernels=KernelChoices(index_top_k=method))
        state = model.new_state()
        return torch.cat([model.compute_logits(model(ids[i:i + 7], state)) for i in range(0, len(ids), 7)])

    ranked = logits("ranked")
    assert not calls
    assert torch.equal(logits("threshold"), ranked)
    assert calls


def test_kernel_choices_default_to_the_configs_defaults():
    from cluster.config import ModelSettings
    from model_shards.deepseek_v4.kernel_choices import KernelChoices

    fields = ModelSettings.model_fields
    assert KernelChoices() == KernelChoices(fields["deepseek_v4_chunk_attention"].default,
                                            fields["deepseek_v4_index_top_k"].default)


def test_an_unknown_top_k_method_is_refused_by_name():
    from model_shards.deepseek_v4.kernel_choices import KernelChoices

    with pytest.raises(ValueError, match="'radix' is not one of ranked, threshold"):
        KernelChoices(index_top_k="radix")
