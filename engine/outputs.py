"""What the engine hands back per step and per request: deltas, ready to stream."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.step import SampledToken


@dataclass(frozen=True)
class CompletionDelta:
    """New output of one sequence since its previous delta. The last one has finished=True."""

    request_id: str  # the caller's id; n > 1 sequences share it and differ by `index`
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledToken, ...]  # one per token in token_ids when logprobs were asked for
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    num_prefix_hit_tokens: int  # prompt tokens served from the prefix cache
    num_kv_blocks: int = 0  # blocks the sequence held when the delta was made
    num_host_hit_tokens: int = 0  # of the prefix hits, restored from host memory
    num_redis_hit_tokens: int = 0  # of the prefix hits, restored from Redis
    # prompt_logprobs: on a sequence's first delta, one per prompt token after the first.
    prompt_logprobs: tuple[SampledToken, ...] | None = None
    error: str | None = None  # why the sequence failed (finish_reason "error"); the caller's alone


class RequestFailedError(RuntimeError):
    """Handling this request failed inside the engine; the engine and other requests go on."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routing, autoscaling and metrics. Tokens, not requests."""

    num_running: int
    num_waiting: int
    num_queued_tokens: int  # prompt tokens not yet computed, over the waiting queue
    num_running_kv_tokens: int
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    block_size: int
    kv_redis_up: bool | None = None  # None: no Redis tier; else its last background ping
    # The autoscaler's signal (engine/backlog.py): prefill still owed, net of expected prefix hits.
    num_pending_prefill_tokens: int = 0
    pending_prefill_s: float = 0.0
    num_decoding: int = 0
    longest_request_tokens: int = 0  # prompt + output of the longest request in flight
