"""The messages between the scheduler (driver, no tensors) and the model workers.

One `StepInput` per engine step carries only what changed since the last step, so that it stays
small even with a 1M-token sequence in flight: a request's prompt travels once (when it is first
scheduled, or again after a preemption), later steps send its new block ids and how many tokens
to compute. Workers keep per-request state (tokens, block table, sampler state) keyed by request
id and append the tokens they sample themselves. Plain dataclasses of ints: cheap to pickle for
Ray actors and torch.distributed workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol.kv_transfer_ops import KVTransferOps, KVTransferReport
from protocol.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the workers have not seen (or must rebuild after a preemption)."""

    request_id: str
    prompt_token_ids: Sequence[int]  # the request's array (protocol/token_ids.py); read only
    output_token_ids: tuple[int, ...]  # non-empty when a preempted request resumes
    sampling_params: SamplingParams
    # Its whole block table at this step, one per KV block group (kvcache/block_groups.py):
    # dense models have one group; a sliding-window group holds NULL_BLOCK (-1) where freed.
    block_ids: tuple[tuple[int, ...], ...]
    num_computed_tokens: int  # tokens whose KV is already in those blocks (prefix-cache hits)


@dataclass(frozen=True)
class CachedRequestData:
    """A request the workers already hold: only its growth."""

    request_id: str
    new_block_ids: tuple[tuple[int, ...], ...]  # appended to each group's table, group 0 first
    num_computed_tokens: int


@dataclass(frozen=True)
class StepInput:
    step_id: int
    new_requests: tuple[NewRequestData, ...] = ()
    cached_requests: tuple[CachedRequestData, ...] = ()
    # request id -> tokens to compute this step, starting at its num_computed_tokens.
    # A request samples a token when the scheduled tokens reach the end of its known tokens.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: frozenset[str] = frozenset()  # workers drop their state for these
    # Moves between the KV tiers, applied before the forward pass (protocol/kv_transfer_ops.py).
    kv_transfers: KVTransferOps | None = None

    @property
    def total_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def scheduled_spans(self) -> list[tuple[int, int]]:
        """(first position, tokens) of each request's chunk this step."""
        starts = {new.request_id: new.num_computed_tokens for new in self.new_requests}
        starts.update((cached.request_id, cached.num_computed_tokens) for cached in self.cached_requests)
        return [(starts[request_id], count) for request_id, count in self.num_scheduled_tokens.items()]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of consecutive prompt tokens, from one step's chunk of a request's prompt."""

    first_position: int  # prompt position of tokens[0] (>= 1: the first prompt token has none)
    tokens: tuple[SampledToken, ...]  # token_id: the prompt's own token at that position


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    sampled: dict[str, SampledToken] = field(default_factory=dict)  # only requests that sampled
    kv_report: KVTransferReport | None = None  # what the worker's tier transfers did
    # Requests that asked for prompt_logprobs and had prompt rows in this step.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    # request id -> why the worker could not handle it this step (its sampling state, its sample):
    # the engine ends that request with this error; the rest of the step stands.
    failed: dict[str, str] = field(default_factory=dict)
