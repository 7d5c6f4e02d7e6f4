"""Run the engine to completion over a batch of prompts: the CLI, tests and benches use this."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.outputs import CompletionDelta
from engine.progress import PrefillProgress
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken


@dataclass
class GenerationResult:
    """One finished sequence, with the timing that the CLI's --json reports."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[SampledToken] | None = None  # of prompt tokens 1, 2, ... (prompt_logprobs)
    finish_reason: str | None = None
    error: str | None = None  # why it failed (finish_reason "error")
    num_prompt_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # device + host + Redis
    num_host_hit_tokens: int = 0
    num_redis_hit_tokens: int = 0
    num_kv_blocks: int = 0
    start_time: float = 0.0
    first_token_time: float | None = None
    end_time: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.start_time

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.end_time is None or self.first_token_time is None or len(self.token_ids) < 2:
            return None
        return (self.end_time - self.first_token_time) / (len(self.token_ids) - 1)

    def absorb(self, delta: CompletionDelta, now: float) -> None:
        if delta.token_ids and self.first_token_time is None:
            self.first_token_time = now
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_prefix_hit_tokens = delta.num_prefix_hit_tokens
        self.num_host_hit_tokens = delta.num_host_hit_tokens
        self.num_redis_hit_tokens = delta.num_redis_hit_tokens
        self.num_kv_blocks = max(self.num_kv_blocks, delta.num_kv_blocks)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.error = delta.error
            self.end_time = now


def generate(
    engine: LLMEngine,
    prompts: list[str | list[int]],
    params: SamplingParams | list[SamplingParams],
    cache_salt: str | None = None,
    on_progress: Callable[[list[PrefillProgress]], None] | None = None,
) -> list[list[GenerationResult]]:
    """Generate for every prompt at once (continuous batching); result[i][j] is prompt i's j-th
    sequence. `on_progress` gets the prefills under way after every step."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    start = time.monotonic()
    results: dict[tuple[str, int], GenerationResult] = {}
    request_ids = [f"offline-{start:.6f}-{i}" for i in range(len(prompts))]
    for request_id, prompt, request_params in zip(request_ids, prompts, params_list):
        engine.add_request(request_id, prompt, request_params, cache_salt)
        for index in range(request_params.n):
            results[(request_id, index)] = GenerationResult(request_id, index, start_time=start)

    def absorb(deltas: list[CompletionDelta]) -> None:
        now = time.monotonic()
        for delta in deltas:
            results[(delta.request_id, delta.index)].absorb(delta, now)

    while engine.has_unfinished_requests():
        engine.step(absorb)  # scheduler.overlap_outputs: a step's text while the next one runs
        if on_progress is not None:
            on_progress(engine.prefill_progress.current)
    return [[results[(rid, i)] for i in range(p.n)] for rid, p in zip(request_ids, params_list)]
