"""bench/vs_transformers.py measures transformers at a shape it ran before.

On an H100 (torch 2.11) transformers' SDPA goes to cuDNN, which builds an execution plan per new
attention shape (~50-80 ms of host time) and keeps it for the process; transformers' decode makes
a new shape every token (the key length grows by one). Here a stand-in for SDPA keeps such a
cache, and charges a sleep per new shape: the measured call of a case must build no plan (its
first call built them all), and the first call, reported apart, pays them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import vs_transformers_cases as cases  # noqa: E402
from model_shards.make_model import make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAN_S = 0.15  # what one new shape costs the stand-in


class PlannedAttention:
    """F.scaled_dot_product_attention with a per-shape plan cache, like cuDNN's (MHAGraphCache)."""

    def __init__(self, sdpa):
        self.sdpa, self.plans = sdpa, set()

    def __call__(self, query, key, value, attn_mask=None, *args, **kwargs):
        shape = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(),
                 None if attn_mask is None else (attn_mask.shape, attn_mask.stride()), kwargs.get("is_causal"))
        if shape not in self.plans:
            self.plans.add(shape)
            time.sleep(PLAN_S)
        return self.sdpa(query, key, value, attn_mask, *args, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", num_hidden_layers=2,
                        max_position_embeddings=512)
    return cases.load_hf(str(folder), torch.device("cpu"))


@pytest.fixture
def attention(monkeypatch):
    planned = PlannedAttention(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", planned)
    plans_per_call = []
    generate = cases.hf_generate

    def counted(*args, **kwargs):
        before = len(planned.plans)
        result = generate(*args, **kwargs)
        plans_per_call.append(len(planned.plans) - before)
        return result

    monkeypatch.setattr(cases, "hf_generate", counted)
    return plans_per_call


def test_one_request_is_measured_without_plans_and_its_first_call_apart(model, attention):
    cpu = torch.device("cpu")
    cases.hf_single(model, 40, 2, 40, cpu)  # the bench's warm-up: another shape, no help
    result = cases.hf_single_steady(model, 60, 4, 60, cpu, first_seed_offset=7)
    # prefill + 3 decode steps, each a new key length: four plans in the first call, none after
    assert attention == [2, 4, 0]
    assert result["first_call"]["tpot_ms"] > PLAN_S * 1e3 * 0.9
    assert result["tpot_ms"] < result["first_call"]["tpot_ms"] - PLAN_S * 1e3 / 2
    assert result["tokens"] == cases.hf_single(model, 60, 4, 60, cpu)["tokens"]  # the measured prompt is seed 60's


def test_a_batch_is_measured_without_plans(model, attention):
    result = cases.hf_batch_steady(model, [30, 41, 52], 3, torch.device("cpu"), first_seed_offset=7)
    assert attention[0] > 0 and attention[1] == 0
    assert set(result["first_call"]) == {"ttft_mean_s", "ttft_max_s", "output_tok_per_s"}


def test_sdpa_choices_names_a_backend_for_prefill_and_decode(model):
    choices = cases.sdpa_choices(model, 100, torch.device("cpu"))
    assert {choices["prefill"], choices["decode"]} <= {"FLASH_ATTENTION", "MATH", "EFFICIENT_ATTENTION",
                                                        "CUDNN_ATTENTION"}


def test_transformers_best_logits_are_its_greedy_tokens(model):
    """The top logits kept per step are the ones greedy search took its tokens from."""
    result = cases.hf_single(model, 50, 4, 50, torch.device("cpu"))
    assert len(result["top"]) == 4
    assert [step[0][0] for step in result["top"]] == result["tokens"]
    assert all(step[0][1] >= step[1][1] >= step[4][1] for step in result["top"])
    batch = cases.hf_batch(model, [30, 41], 3, torch.device("cpu"))
    assert [[step[0][0] for step in row] for row in batch["top"]] == batch["tokens"]


def test_a_difference_names_its_step_and_how_far_our_token_was_behind():
    from bench.vs_transformers_report import first_difference, rows_equal

    top = [[[7, 3.5], [9, 3.2]], [[4, 2.0], [5, 1.97], [6, 1.5]], [[1, 0.5], [2, 0.1]]]
    assert first_difference([7, 4, 1], [7, 4, 1], top) == "True"
    assert first_difference([7, 5, 2], [7, 4, 1], top) == "2:0.030"  # the first differing step only
    assert first_difference([7, 8, 1], [7, 4, 1], top) == "2:?"  # not among its best
    assert first_difference([7, 5], [7, 4], None) == "2:?"
    mine = {"tokens": [[7, 4, 1], [7, 6, 1]]}
    theirs = {"tokens": [[7, 4, 1], [7, 4, 1]], "top": [top, top]}
    assert rows_equal(mine, theirs) == "1/2 (2:0.500)"
