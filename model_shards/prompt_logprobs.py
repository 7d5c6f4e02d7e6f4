"""Prompt logprobs (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`): each prompt
token's logprob given the tokens before it, from the hidden states of the prefill chunks that
the step computes anyway. No second pass: the row of position p already predicts token p + 1.

Region map of one request's chunk [start, start + num_new) of a P-token prompt:

    positions   start ............................ min(start + num_new, P - 1) ... start + num_new
    predicts    prompt token start + 1 ...         prompt token P - 1 | first output token
                └──────── these rows: PromptRows ─────────┘            └ the sampler's row

The logits of those rows are made PROMPT_LOGITS_ROWS at a time (a (rows, vocab) float32 block
each), and every request's results leave the device in one transfer per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protocol.step import PromptLogprobs, SampledToken

# (512, 128K vocab) float32 logits: 256 MB of scratch, whatever the chunk size.
PROMPT_LOGITS_ROWS = 512


@dataclass(frozen=True)
class PromptRows:
    """The rows of one request's chunk whose next token is a prompt token."""

    request_id: str
    first_row: int  # row in the step's hidden states of position first_position - 1
    first_position: int  # prompt position predicted by first_row (>= 1)
    num_rows: int
    top_k: int
    target_ids: tuple[int, ...]  # the prompt tokens at first_position ... + num_rows - 1


def prompt_rows(request_id: str, first_row: int, start: int, num_new: int, token_ids: Sequence[int],
                num_prompt_tokens: int, top_k: int | None) -> PromptRows | None:  # fmt: skip
    """The chunk [start, start + num_new) of `token_ids` (prompt, then outputs); None when the
    request asked for no prompt logprobs (`top_k` None) or the chunk predicts no prompt token (it
    is the prompt's last token alone, or outputs)."""
    end = min(start + num_new, num_prompt_tokens - 1)
    if top_k is None or end <= start:
        return None
    return PromptRows(request_id, first_row, start + 1, end - start, top_k, tuple(token_ids[start + 1 : end + 1]))


def compute_prompt_logprobs(hidden: torch.Tensor, spans: Sequence[PromptRows],
                            compute_logits: Callable[[torch.Tensor], torch.Tensor],
                            keep: bool = True,
                            before_sync: Callable[[], None] | None = None) -> dict[str, PromptLogprobs]:  # fmt: skip
    """`hidden` (tokens, hidden). `compute_logits` may be a collective (tensor parallel): every
    rank calls it for the same rows; only the rank that `keep`s turns them into results.
    `before_sync()` runs right before the host waits for them (the engine's overlapped work)."""
    parts: list[torch.Tensor] = []
    for span in spans:
        for first in range(0, span.num_rows, PROMPT_LOGITS_ROWS):
            count = min(PROMPT_LOGITS_ROWS, span.num_rows - first)
            rows = hidden[span.first_row + first : span.first_row + first + count]  # (count, hidden)
            logits = compute_logits(rows)  # (count, vocab)
            if keep:
                parts.append(_chunk_logprobs(logits, span.target_ids[first : first + count], span.top_k))
    if not keep or not spans:
        return {}
    packed = torch.cat(parts)
    if before_sync is not None:
        before_sync()
    packed = packed.tolist()  # the one device-to-host transfer
    return _unpack(packed, spans)


def _chunk_logprobs(logits: torch.Tensor, target_ids: Sequence[int], top_k: int) -> torch.Tensor:
    """(count * (1 + 2k),) float64: the targets' logprobs, then top ids, then top logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)  # (count, vocab)
    targets = torch.tensor(target_ids, dtype=torch.long, device=logits.device).unsqueeze(1)  # (count, 1)
    parts = [logprobs.gather(1, targets).squeeze(1)]
    if top_k:
        top_values, top_ids = logprobs.topk(top_k, dim=-1)  # (count, k), best first
        parts += [top_ids.flatten(), top_values.flatten()]
    # float64: token ids (< 2**53) survive the round trip exactly.
    return torch.cat([part.double() for part in parts])


def _unpack(packed: list[float], spans: Sequence[PromptRows]) -> dict[str, PromptLogprobs]:
    results, offset = {}, 0
    for span in spans:
        tokens: list[SampledToken] = []
        for first in range(0, span.num_rows, PROMPT_LOGITS_ROWS):
            count = min(PROMPT_LOGITS_ROWS, span.num_rows - first)
            targets = span.target_ids[first : first + count]
            tokens += _tokens(packed[offset : offset + count * (1 + 2 * span.top_k)], targets, span.top_k)
            offset += count * (1 + 2 * span.top_k)
        results[span.request_id] = PromptLogprobs(span.first_position, tuple(tokens))
    return results


def _tokens(chunk: list[float], target_ids: Sequence[int], top_k: int) -> list[SampledToken]:
    count = len(target_ids)
    ids, values = chunk[count : count + count * top_k], chunk[count + count * top_k :]
    return [
        SampledToken(token_id, chunk[i], tuple(zip(map(int, ids[i * top_k : (i + 1) * top_k]),
                                                   values[i * top_k : (i + 1) * top_k])))
        for i, token_id in enumerate(target_ids)
    ]  # fmt: skip
