"""The sampler against Hugging Face's logits processors, hand-computed penalties, and its own RNG contract."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model_shards.sampler import (
    Sampler,
    SamplingState,
    _apply_presence_frequency_penalties,
    _apply_repetition_penalty,
    _sampling_probs,
)
from protocol.sampling_params import SamplingParams

VOCAB = 64


def states_for(params_list, prompt=(0, 1), vocab=VOCAB):
    states = [SamplingState(params, prompt) for params in params_list]
    for state in states:
        state.ensure_penalty_tensors(vocab)
    return states


def random_logits(rows, vocab=VOCAB, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def hf_probs(row_logits, params):
    """Hugging Face's generate() warper chain (same order) on one (vocab,) row, then softmax."""
    scores = row_logits.unsqueeze(0)
    no_ids = torch.zeros(1, 0, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(no_ids, scores)
    return scores.softmax(dim=-1).squeeze(0)


# --- greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax_of_each_row():
    logits = random_logits(6)
    tokens = Sampler()(logits, states_for([SamplingParams()] * 6))
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs == () for t in tokens)


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, 0.0, 0.0]])
    tokens = Sampler()(logits, states_for([SamplingParams()] * 3, vocab=4))
    assert [t.token_id for t in tokens] == [1, 0, 2]


def test_sampler_leaves_the_input_logits_untouched():
    logits = random_logits(3)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=5, repetition_penalty=1.5, presence_penalty=1.0, min_tokens=1, eos_token_ids=(3,)
    )
    Sampler()(logits, states_for([params, SamplingParams(), SamplingParams(temperature=1.0, min_p=0.1)]))
    assert torch.equal(logits, before)


# --- penalties ----------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_row_by_row():
    logits = random_logits(3)
    history = [((1, 5, 5, 9), (9, 12)), ((2, 3), ()), ((40, 41), (63, 0, 0))]  # (prompt, outputs)
    penalties = [1.3, 1.0, 0.7]
    states = []
    for (prompt, outputs), penalty in zip(history, penalties):
        state = SamplingState(SamplingParams(repetition_penalty=penalty), prompt, outputs[:1])
        for token in outputs[1:]:
            state.append(token)
        state.ensure_penalty_tensors(VOCAB)
        states.append(state)
    ours = _apply_repetition_penalty(logits, states)
    for row, ((prompt, outputs), penalty) in enumerate(zip(history, penalties)):
        input_ids = torch.tensor([prompt + outputs])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row], expected[0], rtol=0, atol=0)
    assert not torch.equal(ours[0], logits[0])  # the penalty did something


def test_presence_and_frequency_penalties_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplingState(params, prompt_token_ids=(0, 2), output_token_ids=(1,))  # prompt: not penalized
    state.append(1)
    state.append(3)
    state.ensure_penalty_tensors(5)
    # token 1: twice  -> 2 - 0.5 - 2*0.25 = 1.0;  token 3: once -> 4 - 0.5 - 0.25 = 3.25
    expected = torch.tensor([[1.0, 1.0, 3.0, 3.25, 0.5]])
    torch.testing.assert_close(_apply_presence_frequency_penalties(logits, [state]), expected)


def test_repetition_then_presence_frequency_order_and_counts_kept_incrementally():
    logits = torch.tensor([[1.0, 2.0, -3.0, 4.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    state = SamplingState(params, prompt_token_ids=(0, 2))
    tokens = Sampler()(logits, [state])  # builds the tensors; greedy -> 3
    assert tokens[0].token_id == 3
    state.append(3)
    state.append(3)
    assert state.output_counts.tolist() == [0, 0, 0, 2, 0]
    assert state.prompt_mask.tolist() == [True, False, True, False, False]
    penalized = _apply_presence_frequency_penalties(_apply_repetition_penalty(logits, [state]), [state])
    # 0: prompt, 1/2 ; 2: prompt, -3*2 ; 3: 4/2 - 1 - 2*0.5 = 0.0 ; 1 and 4 untouched
    torch.testing.assert_close(penalized, torch.tensor([[0.5, 2.0, -6.0, 0.0, 0.5]]))
    assert Sampler()(logits, [state])[0].token_id == 1


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0]])  # eos 3 best, stop id 1 second
    params = SamplingParams(min_tokens=2, eos_token_ids=(3,), stop_token_ids=(1,))
    state = SamplingState(params, (0,))
    chosen = []
    for _ in range(3):
        token = Sampler()(logits, [state])[0].token_id
        chosen.append(token)
        state.append(token)
    assert chosen == [4, 4, 3]


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0]])
    params = SamplingParams(min_tokens=1, eos_token_ids=(3,), stop_token_ids=(1,), ignore_eos=True)
    assert Sampler()(logits, [SamplingState(params, (0,))])[0].token_id == 3
    params = SamplingParams(min_tokens=1, eos_token_ids=(3,), stop_token_ids=(3, 1))
    assert Sampler()(logits, [SamplingState(params, (0,))])[0].token_id == 4


# --- temperature, top_k, top_p, min_p ------------------------------------------------------------

WARPER_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=1000),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=1.0, top_p=0.01),
    SamplingParams(temperature=1.2, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=1.0),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.8),
    SamplingParams(temperature=2.0, top_k=30, top_p=0.95, min_p=0.1),
]


def test_warped_probabilities_match_transformers_in_one_mixed_batch():
    logits = random_logits(len(WARPER_CASES), seed=1, scale=2.0)
    probs = _sampling_probs(logits, states_for(WARPER_CASES))  # (rows, vocab)
    for row, params in enumerate(WARPER_CASES):
        expected = hf_probs(logits[row], params)
        assert torch.equal(probs[row] > 0, expected > 0), params
        torch.testing.assert_close(probs[row], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(probs[row].sum(), torch.tensor(1.0))


def test_warpers_really_shrink_the_support():
    logits = random_logits(len(WARPER_CASES), seed=1, scale=2.0)
    support = (_sampling_probs(logits, states_for(WARPER_CASES)) > 0).sum(dim=-1).tolist()
    by_case = dict(zip(range(len(WARPER_CASES)), support))
    assert by_case[0] == VOCAB and by_case[4] == VOCAB
    assert by_case[2] == 5 and by_case[3] == 1 and by_case[9] == 1
    assert 1 < by_case[6] < VOCAB and by_case[7] == 1 and 1 < by_case[8] < VOCAB


def test_top_k_keeps_ties_with_the_kth_logit_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    probs = _sampling_probs(logits, states_for([params], vocab=5))[0]
    assert (probs > 0).tolist() == [False, True, True, True, False]
    torch.testing.assert_close(probs, hf_probs(logits[0], params))


def test_sampled_tokens_stay_inside_the_filtered_support():
    logits = random_logits(1, seed=2).expand(2000, VOCAB)
    params = SamplingParams(temperature=1.5, top_k=7, top_p=0.9)
    allowed = set(hf_probs(logits[0], params).nonzero().flatten().tolist())
    torch.manual_seed(0)
    tokens = {t.token_id for t in Sampler()(logits, states_for([params] * 2000))}
    assert tokens <= allowed and len(tokens) > 1


# --- randomness -----------------------------------------------------------------------------------


def sample_sequence(seed_row_params, batch_position, neighbours, steps=50):
    """Token ids of the seeded row over `steps` steps, with other rows around it."""
    neighbour_logits = list(random_logits(len(neighbours), seed=4, scale=1.0))
    neighbour_logits.insert(batch_position, random_logits(1, seed=3, scale=1.0)[0])
    logits = torch.stack(neighbour_logits)  # (1 + neighbours, vocab); the seeded row's logits never change
    params = list(neighbours)
    params.insert(batch_position, seed_row_params)
    states = [SamplingState(p, (0, 1)) for p in params]
    sampler = Sampler()
    sequence = []
    for _ in range(steps):
        tokens = sampler(logits, states)
        for state, token in zip(states, tokens):
            state.append(token.token_id)
        sequence.append(tokens[batch_position].token_id)
    return sequence


def test_same_seed_same_tokens_whatever_the_batch():
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = sample_sequence(seeded, 0, [])
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3, seed=7),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_p=0.5, presence_penalty=1.0),
    ]
    assert sample_sequence(seeded, 0, others) == alone
    assert sample_sequence(seeded, 2, others) == alone
    assert sample_sequence(seeded, 4, others[::-1]) == alone
    assert len(set(alone)) > 5  # really sampling, not stuck on one token


def test_different_seeds_give_different_tokens():
    first = sample_sequence(SamplingParams(temperature=1.0, seed=1), 0, [])
    second = sample_sequence(SamplingParams(temperature=1.0, seed=2), 0, [])
    assert first != second


def chi_square(token_ids, probs):
    counts = torch.bincount(torch.tensor(token_ids), minlength=len(probs)).double()
    expected = probs.double() * len(token_ids)
    return float(((counts - expected) ** 2 / expected).sum())


CHI_SQUARE_4_DOF_P_0_001 = 18.47


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_softmax(seeded):
    samples = 20_000
    logits = torch.tensor([[0.1, 1.0, -0.5, 2.0, 0.3]])
    if seeded:  # one seed per row exercises the per-request generators
        states = [SamplingState(SamplingParams(temperature=1.0, seed=seed), (0,)) for seed in range(samples)]
    else:
        torch.manual_seed(0)
        states = [SamplingState(SamplingParams(temperature=1.0), (0,))] * samples
    tokens = Sampler()(logits.expand(samples, 5), states)
    assert chi_square([t.token_id for t in tokens], logits[0].softmax(dim=-1)) < CHI_SQUARE_4_DOF_P_0_001


def test_empirical_distribution_with_top_k_is_renormalized():
    samples = 20_000
    logits = torch.tensor([[0.1, 1.0, -0.5, 2.0, 0.3]])
    torch.manual_seed(1)
    states = [SamplingState(SamplingParams(temperature=1.0, top_k=3), (0,))] * samples
    token_ids = [t.token_id for t in Sampler()(logits.expand(samples, 5), states)]
    assert set(token_ids) == {1, 3, 4}
    kept = torch.tensor([1, 3, 4])
    counts = torch.bincount(torch.tensor(token_ids), minlength=5)[kept].double()
    expected = logits[0, kept].softmax(dim=-1).double() * samples
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82  # 2 dof, p = 0.001


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_best_first():
    logits = random_logits(4, seed=4)
    raw = logits.log_softmax(dim=-1)
    penalizing = dict(temperature=0.7, top_k=10, repetition_penalty=1.5, frequency_penalty=1.0)
    params = [
        SamplingParams(logprobs=3, **penalizing),
        SamplingParams(logprobs=None),
        SamplingParams(logprobs=0, temperature=1.0),
        SamplingParams(logprobs=5),
    ]
    tokens = Sampler()(logits, states_for(params))
    for row in (0, 2, 3):
        assert tokens[row].logprob == pytest.approx(raw[row, tokens[row].token_id].item(), abs=0)
    assert tokens[1].logprob is None and tokens[1].top_logprobs == ()
    assert tokens[2].top_logprobs == ()
    for row, k in ((0, 3), (3, 5)):
        best_values, best_ids = raw[row].sort(descending=True)
        expected = [(i, v) for i, v in zip(best_ids[:k].tolist(), best_values[:k].tolist())]
        assert list(tokens[row].top_logprobs) == expected
        assert all(isinstance(i, int) for i, _ in tokens[row].top_logprobs)
    assert tokens[3].top_logprobs[0] == (tokens[3].token_id, tokens[3].logprob)  # greedy: the best


def test_logprob_of_a_penalized_greedy_row_is_still_raw():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    state = SamplingState(SamplingParams(repetition_penalty=2.0, logprobs=1), prompt_token_ids=(0,))
    token = Sampler()(logits, [state])[0]
    assert token.token_id == 1  # 2.0 / 2 < 1.9
    assert token.logprob == pytest.approx(logits.log_softmax(-1)[0, 1].item(), abs=0)
    best_id, best_logprob = token.top_logprobs[0]
    assert best_id == 0 and math.isclose(best_logprob, logits.log_softmax(-1)[0, 0].item())


def test_logit_bias_moves_only_its_rows_tokens_before_penalties_and_keeps_raw_logprobs():
    logits = random_logits(3, seed=6)
    raw = logits.log_softmax(dim=-1)
    worst = int(logits[0].argmin())
    best = int(logits[1].argmax())
    params = [
        SamplingParams(logit_bias=((worst, 100.0),), logprobs=0),  # +100: the worst token wins
        SamplingParams(logit_bias=((best, -100.0), (3, 0.5))),  # -100: the best is banned
        SamplingParams(),  # untouched
    ]
    tokens = Sampler()(logits, states_for(params))
    assert tokens[0].token_id == worst
    assert tokens[0].logprob == pytest.approx(raw[0, worst].item(), abs=0)  # raw, not biased
    biased = logits[1].clone()
    biased[best] -= 100.0
    biased[3] += 0.5
    assert tokens[1].token_id == int(biased.argmax()) != best
    assert tokens[2].token_id == int(logits[2].argmax())


def test_logit_bias_comes_before_the_repetition_penalty():
    """vLLM's order: bias, then penalties. A prompt token at logit 1.0 biased by +1.0 is 2.0,
    divided by a penalty of 2 back to 1.0: below the unpenalized 1.5 (penalty first would give
    0.5 + 1.0 = 1.5, a tie the lowest id, token 0, would win)."""
    logits = torch.tensor([[1.0, 1.5, -1.0]])
    state = SamplingState(SamplingParams(logit_bias=((0, 1.0),), repetition_penalty=2.0), prompt_token_ids=(0,))
    state.ensure_penalty_tensors(3)
    assert Sampler()(logits, [state])[0].token_id == 1


@pytest.mark.parametrize(
    ("logit_bias", "message"),
    [(((1, 100.5),), "between -100 and 100"), (((1, float("nan")),), "between -100 and 100"),
     (((-1, 1.0),), ">= 0"), (tuple((i, 1.0) for i in range(1025)), "at most 1024")],
)
def test_logit_bias_out_of_range_names_the_parameter(logit_bias, message):
    from protocol.sampling_params import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=message) as error:
        SamplingParams(logit_bias=logit_bias)
    assert error.value.param == "logit_bias"
