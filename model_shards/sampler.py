"""Turns the last-position logits of each sampling request into one token, on the model worker.

One step, for the rows of `logits` (num_requests, vocab), row i belonging to `states[i]`:

    raw logits ──► logprobs (log_softmax of the RAW logits: OpenAI / vLLM "raw logprobs")
        │
        ├─ grammar mask            structured outputs: tokens the grammar forbids → -inf
        ├─ logit bias              OpenAI's logit_bias: + bias on the listed tokens (before penalties, as vLLM)
        ├─ repetition penalty      HF / CTRL, over prompt + output: logit > 0 → /p, else *p
        ├─ presence / frequency    OpenAI, over output only: logit -= presence*(count>0) + frequency*count
        ├─ min_tokens              eos and stop_token_ids → -inf while fewer than min_tokens outputs
        ├─ greedy rows             argmax (ties → lowest id)
        └─ other rows              / temperature → top_k → top_p → min_p → softmax → sample

Each stage runs once per step over the rows that need it (none: skipped), never per token: rows
with top_p share one sort, rows with only top_k one (cheaper) topk.
Penalty counts live on the request's `SamplingState` and grow by one token per `append`, so a
1M-token prompt costs its work once, when its prompt mask is built. The only device-to-host copy
is one `.tolist()` at the end of the step; the small per-row parameter tensors go host-to-device
from pinned memory without waiting for the GPU.

Sampling is the exponential race `argmax(probs / q)` with q ~ Exp(1), which picks token i with
probability probs[i]. A request with a `seed` draws its q from its own generator, seeded once when
its state is created, so that given the same logits a seed fully determines the row's tokens,
whatever else shares the batch and wherever the row sits in it. (For n > 1 the engine gives the n
sequences seeds seed, seed + 1, ...) Requests without a seed draw from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model_shards.device import host_to_device, upload_packed
from model_shards.structured_output import RequestGrammar, apply_grammar_masks
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken


class SamplingState:
    """One request's (one sequence's) sampler state, owned by the worker for the request's life."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] = (),
        device: str | torch.device = "cpu",
        grammar: RequestGrammar | None = None,
    ):
        """`grammar`: on the rank that samples, when the request asked for structured output."""
        self.params = params
        self.grammar = grammar
        self.device = torch.device(device)
        self.num_output_tokens = len(output_token_ids)
        self.generator = _seeded_generator(params.seed, self.device)
        self.stop_ids_before_min_tokens = _stop_ids_before_min_tokens(params)
        # The penalty tensors are (vocab,) and the vocab size arrives with the first logits; until
        # then keep the ids they will be built from.
        self._prompt_ids_to_mark = prompt_token_ids if params.repetition_penalty != 1.0 else ()
        self._outputs_to_count = list(output_token_ids) if params.has_penalties else []
        self.prompt_mask: torch.Tensor | None = None  # (vocab,) bool: token occurs in the prompt
        self.output_counts: torch.Tensor | None = None  # (vocab,) int32: times the token was generated

    def append(self, token_id: int) -> None:
        """Record a token sampled for this request; the worker calls this after each step."""
        self.num_output_tokens += 1
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if not self.params.has_penalties:
            return
        if self.output_counts is None:
            self._outputs_to_count.append(token_id)
        else:
            self.output_counts[token_id] += 1  # one tiny kernel, no host sync

    def ensure_penalty_tensors(self, vocab_size: int) -> None:
        """Build `prompt_mask` and `output_counts` once, when the vocab size is first known."""
        if self.output_counts is not None or not self.params.has_penalties:
            return
        self.output_counts = _token_counts(self._outputs_to_count, vocab_size, self.device)
        if self.params.repetition_penalty != 1.0:
            self.prompt_mask = _token_counts(self._prompt_ids_to_mark, vocab_size, self.device) > 0
        self._prompt_ids_to_mark, self._outputs_to_count = (), []

    @property
    def below_min_tokens(self) -> bool:
        return self.num_output_tokens < self.params.min_tokens


class Sampler:
    """Samples one token per row of `logits`; stateless, the per-request state is in `states`."""

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState],
                 before_sync: Callable[[], None] | None = None) -> list[SampledToken]:  # fmt: skip
        """One token per row. `before_sync()` runs once the step's kernels are queued, right
        before the host waits for the tokens (the engine's overlapped host work)."""
        if len(states) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits rows for {len(states)} sampling states")
        if not states:
            return []
        logits = logits.float()  # (num_requests, vocab)
        for state in states:
            state.ensure_penalty_tensors(logits.shape[1])
        logprobs = _raw_logprobs_for_rows_that_ask(logits, states)
        logits = apply_grammar_masks(logits, [state.grammar for state in states])
        logits = _apply_logit_bias(logits, states)
        logits = _apply_repetition_penalty(logits, states)
        logits = _apply_presence_frequency_penalties(logits, states)
        logits = _mask_stop_tokens_before_min_tokens(logits, states)
        token_ids = _choose_tokens(logits, states)  # (num_requests,)
        return _to_sampled_tokens(token_ids, logprobs, states, before_sync)


# --- state construction --------------------------------------------------------------------------


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _stop_ids_before_min_tokens(params: SamplingParams) -> tuple[int, ...]:
    # With ignore_eos the eos tokens do not stop the request, so there is nothing to hold back.
    eos_ids = () if params.ignore_eos else params.eos_token_ids
    return tuple(dict.fromkeys(eos_ids + params.stop_token_ids))


def _token_counts(token_ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # (num_tokens,)
    # Ids past the logits' vocab (embedding vocab larger than lm_head) can never be sampled: dropped.
    counts = torch.bincount(ids[ids < vocab_size], minlength=vocab_size)  # (vocab,)
    return host_to_device(counts.to(torch.int32), device)


# --- per-step helpers ----------------------------------------------------------------------------


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def _rows_where(states: Sequence[SamplingState], wanted) -> list[int]:
    return [row for row, state in enumerate(states) if wanted(state.params)]


def _param_column(states: Sequence[SamplingState], rows: list[int], value, device) -> torch.Tensor:
    """(len(rows), 1) float32 of `value(params)` for the given rows, to broadcast over the vocab."""
    return _to_device([value(states[row].params) for row in rows], torch.float32, device).unsqueeze(1)


# --- penalties and masks -------------------------------------------------------------------------


def _apply_logit_bias(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """logits[row, token] += bias for every (token, bias) of each row's logit_bias: one scatter-add
    for the step, however many rows ask."""
    rows, tokens, biases = [], [], []
    for row, state in enumerate(states):
        for token_id, bias in state.params.logit_bias:
            rows.append(row)
            tokens.append(token_id)
            biases.append(bias)
    if not rows:
        return logits
    row_index, token_index = upload_packed([torch.tensor(rows), torch.tensor(tokens)], logits.device)
    return logits.index_put((row_index, token_index), _to_device(biases, torch.float32, logits.device),
                            accumulate=True)


def _apply_repetition_penalty(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows = _rows_where(states, lambda p: p.repetition_penalty != 1.0)
    if not rows:
        return logits
    index = _to_device(rows, torch.long, logits.device)
    selected = logits.index_select(0, index)  # (R, vocab)
    prompt_mask = torch.stack([states[row].prompt_mask for row in rows])  # (R, vocab) bool
    output_counts = torch.stack([states[row].output_counts for row in rows])  # (R, vocab) int32
    seen = prompt_mask | (output_counts > 0)
    penalty = _param_column(states, rows, lambda p: p.repetition_penalty, logits.device)  # (R, 1)
    penalized = torch.where(selected > 0, selected / penalty, selected * penalty)
    return logits.index_copy(0, index, torch.where(seen, penalized, selected))


def _apply_presence_frequency_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows = _rows_where(states, lambda p: p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)
    if not rows:
        return logits
    index = _to_device(rows, torch.long, logits.device)
    counts = torch.stack([states[row].output_counts for row in rows]).float()  # (F, vocab)
    presence = _param_column(states, rows, lambda p: p.presence_penalty, logits.device)  # (F, 1)
    frequency = _param_column(states, rows, lambda p: p.frequency_penalty, logits.device)  # (F, 1)
    penalty = presence * (counts > 0) + frequency * counts  # (F, vocab)
    return logits.index_copy(0, index, logits.index_select(0, index) - penalty)


def _mask_stop_tokens_before_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows, token_ids = [], []
    for row, state in enumerate(states):
        if state.below_min_tokens:
            rows += [row] * len(state.stop_ids_before_min_tokens)
            token_ids += state.stop_ids_before_min_tokens
    if not rows:
        return logits
    row_index, token_index = _to_device([rows, token_ids], torch.long, logits.device)  # (2, M)
    minus_inf = logits.new_full((), float("-inf"))  # made on the device: no host copy
    return logits.index_put((row_index, token_index), minus_inf)


# --- choosing the token --------------------------------------------------------------------------


def _choose_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """(num_requests,) long: argmax for greedy rows, a sample for the others."""
    token_ids = logits.argmax(dim=-1)  # (num_requests,); sampling rows are overwritten below
    rows = _rows_where(states, lambda p: not p.greedy)
    if not rows:
        return token_ids
    index = _to_device(rows, torch.long, logits.device)
    sampling_states = [states[row] for row in rows]
    probs = _sampling_probs(logits.index_select(0, index), sampling_states)  # (S, vocab)
    return token_ids.index_copy(0, index, _exponential_race(probs, sampling_states))


def _sampling_probs(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """(S, vocab) probabilities of non-greedy rows after temperature, top_k, top_p and min_p."""
    temperature = _param_column(states, list(range(len(states))), lambda p: p.temperature, logits.device)
    logits = logits / temperature  # (S, vocab)
    logits = _apply_top_k_without_top_p(logits, states)
    logits = _apply_top_k_top_p(logits, states)
    logits = _apply_min_p(logits, states)
    return logits.softmax(dim=-1)


def _apply_top_k_without_top_p(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """top_k alone needs only the k-th largest logit: a topk, several times cheaper than a full sort."""
    rows = _rows_where(states, lambda p: p.top_k > 0 and p.top_p == 1.0)
    if not rows:
        return logits
    vocab = logits.shape[-1]
    index = _to_device(rows, torch.long, logits.device)
    top_k = [min(states[row].params.top_k, vocab) for row in rows]
    kth_position = _to_device([k - 1 for k in top_k], torch.long, logits.device).unsqueeze(1)  # (K, 1)
    selected = logits.index_select(0, index)  # (K, vocab)
    largest = selected.topk(max(top_k), dim=-1).values  # (K, max k), best first
    kth_largest = largest.gather(1, kth_position)  # (K, 1)
    # Ties with the k-th largest logit are kept, like TopKLogitsWarper.
    return logits.index_copy(0, index, selected.masked_fill(selected < kth_largest, float("-inf")))


def _apply_top_k_top_p(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows = _rows_where(states, lambda p: p.top_p < 1.0)
    if not rows:
        return logits
    index = _to_device(rows, torch.long, logits.device)
    top_k = _to_device([states[row].params.top_k for row in rows], torch.long, logits.device)  # (T,)
    # 1 - top_p in double, then float32: the same threshold as Hugging Face's TopPLogitsWarper.
    top_p_cut = _param_column(states, rows, lambda p: 1.0 - p.top_p, logits.device)  # (T, 1)
    filtered = _top_k_top_p_filter(logits.index_select(0, index), top_k, top_p_cut)
    return logits.index_copy(0, index, filtered)


def _top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p_cut: torch.Tensor) -> torch.Tensor:
    """Masks to -inf what top_k (0: off) and then top_p drop, with one ascending sort per row.

    Ascending like TopPLogitsWarper, so the cumulative sums match it bit for bit. Ties with the
    k-th largest logit are kept, like TopKLogitsWarper.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # (T, vocab) ascending
    kth_largest_position = torch.where(top_k > 0, vocab - top_k, 0).clamp(min=0)  # (T,)
    kth_largest = sorted_logits.gather(1, kth_largest_position.unsqueeze(1))  # (T, 1)
    # Masked logits are the smallest, so they stay at the front and the order stays ascending.
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (T, vocab)
    outside_top_p = cumulative_probs <= top_p_cut
    outside_top_p[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(outside_top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _apply_min_p(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows = _rows_where(states, lambda p: p.min_p > 0.0)
    if not rows:
        return logits
    index = _to_device(rows, torch.long, logits.device)
    selected = logits.index_select(0, index)  # (M, vocab)
    probs = selected.softmax(dim=-1)
    min_p = _param_column(states, rows, lambda p: p.min_p, logits.device)  # (M, 1)
    # min_p <= 1, so the most likely token always survives.
    too_unlikely = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.index_copy(0, index, selected.masked_fill(too_unlikely, float("-inf")))


def _exponential_race(probs: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """(S,) long: row i's token drawn from probs[i] as argmax(probs / q), q ~ Exp(1)."""
    noise = torch.empty_like(probs).exponential_()  # (S, vocab), global RNG for unseeded rows
    for row, state in enumerate(states):
        if state.generator is not None:
            # A seeded row draws exactly `vocab` numbers from its own stream each step, whatever
            # the batch: that is what makes the seed reproducible.
            noise[row].exponential_(generator=state.generator)
    # q == 0 would turn a zero-probability token into 0/0 = nan, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


# --- logprobs and the trip to the host -----------------------------------------------------------


@dataclass
class _RawLogprobs:
    rows: list[int]  # the rows that asked for logprobs
    all_logprobs: torch.Tensor  # (L, vocab) log_softmax of the raw logits
    top_values: torch.Tensor  # (L, K) best first, K = the largest `logprobs` asked
    top_ids: torch.Tensor  # (L, K)


def _raw_logprobs_for_rows_that_ask(logits: torch.Tensor, states: Sequence[SamplingState]) -> _RawLogprobs | None:
    rows = _rows_where(states, lambda p: p.logprobs is not None)
    if not rows:
        return None
    index = _to_device(rows, torch.long, logits.device)
    all_logprobs = logits.index_select(0, index).log_softmax(dim=-1)  # (L, vocab)
    largest_k = max(states[row].params.logprobs for row in rows)
    top_values, top_ids = all_logprobs.topk(largest_k, dim=-1)  # (L, K), sorted best first
    return _RawLogprobs(rows, all_logprobs, top_values, top_ids)


def _to_sampled_tokens(token_ids: torch.Tensor, logprobs: _RawLogprobs | None, states: Sequence[SamplingState],
                       before_sync: Callable[[], None] | None = None) -> list[SampledToken]:  # fmt: skip
    num_requests = len(states)
    if logprobs is None:
        _call(before_sync)
        return [SampledToken(token_id) for token_id in token_ids.tolist()]  # the step's one sync
    sampled_ids = token_ids[_to_device(logprobs.rows, torch.long, token_ids.device)]  # (L,)
    sampled_logprobs = logprobs.all_logprobs.gather(1, sampled_ids.unsqueeze(1)).squeeze(1)  # (L,)
    # One float64 vector for one transfer: token ids (< 2**53) survive the round trip exactly.
    parts = [token_ids, sampled_logprobs, logprobs.top_ids.flatten(), logprobs.top_values.flatten()]
    packed = torch.cat([part.double() for part in parts])
    _call(before_sync)
    packed = packed.tolist()  # the step's one sync
    tokens = [SampledToken(int(token_id)) for token_id in packed[:num_requests]]
    _fill_logprobs(tokens, packed[num_requests:], logprobs, states)
    return tokens


def _fill_logprobs(
    tokens: list[SampledToken], packed: list[float], logprobs: _RawLogprobs, states: Sequence[SamplingState]
) -> None:
    """Rebuilds the logprob rows' tokens from `packed`: sampled (L), then top ids and values (L, K)."""
    num_rows, largest_k = logprobs.top_ids.shape
    top_ids_start = num_rows
    top_values_start = top_ids_start + num_rows * largest_k
    for j, row in enumerate(logprobs.rows):
        k = states[row].params.logprobs
        ids = packed[top_ids_start + j * largest_k : top_ids_start + j * largest_k + k]
        values = packed[top_values_start + j * largest_k : top_values_start + j * largest_k + k]
        top = tuple((int(token_id), value) for token_id, value in zip(ids, values))
        tokens[row] = SampledToken(tokens[row].token_id, logprob=packed[j], top_logprobs=top)


def _call(work: Callable[[], None] | None) -> None:
    if work is not None:
        work()
