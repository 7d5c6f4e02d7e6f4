"""A dense worker's per-request state and one step's flattened batch, built from the scheduler's
`StepInput`: the scheduled chunks back to back, their positions and the attention metadata."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from model_shards.attention.base import AttentionMetadata
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.sp_attention import build_local_batch
from model_shards.parallel.sp_plan import StepSequence
from model_shards.prompt_logprobs import PromptRows, prompt_rows
from model_shards.sampler import SamplingState
from protocol.step import StepInput


@dataclass
class RequestState:
    token_ids: array  # ('q') prompt + outputs, grows by the tokens this worker samples (protocol/token_ids.py)
    block_table: array  # ('q') block ids: a step copies every row into its padded table (one memcpy each)
    num_computed_tokens: int
    sampling: SamplingState
    num_prompt_tokens: int


@dataclass
class StepBatch:
    """One step's flattened inputs. Rows of `input_ids` are the scheduled chunks, back to back."""

    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    metadata: AttentionMetadata
    sample_rows: list[int]  # row of the last token of each sampling request
    sample_request_ids: list[str]
    prompt_rows: list[PromptRows]  # rows that predict prompt tokens, for prompt_logprobs


def build_batch(requests: dict[str, RequestState], step_input: StepInput, block_size: int,
                device: torch.device) -> StepBatch:
    """The step's rows on one rank (no sequence parallelism); a request samples when its chunk
    reaches its last known token. Its tensors go up in one copy without a host wait (upload_packed),
    so the host builds the next step while the GPU runs this one."""
    token_ids = array("q")  # the step's rows, extended by array slices (memcpy)
    sequences, sample_rows, sample_ids, scored = [], [], [], []
    for request_id, num_new in step_input.num_scheduled_tokens.items():
        state = requests[request_id]
        start = state.num_computed_tokens
        scored.append(_prompt_rows(request_id, state, len(token_ids), num_new))
        token_ids.extend(state.token_ids[start : start + num_new])
        sequences.append((state.block_table, start, num_new))
        if start + num_new == len(state.token_ids):
            sample_rows.append(len(token_ids) - 1)
            sample_ids.append(request_id)
    metadata, input_ids = AttentionMetadata.build_with_inputs(sequences, block_size, device, token_ids)
    return StepBatch(
        input_ids=input_ids,
        positions=metadata.positions,
        metadata=metadata,
        sample_rows=sample_rows,
        sample_request_ids=sample_ids,
        prompt_rows=[rows for rows in scored if rows is not None],
    )


def _prompt_rows(request_id: str, state: RequestState, first_row: int, num_new: int) -> PromptRows | None:
    return prompt_rows(request_id, first_row, state.num_computed_tokens, num_new, state.token_ids,
                       state.num_prompt_tokens, state.sampling.params.prompt_logprobs)


def build_sequence_parallel_batch(requests: dict[str, RequestState], step_input: StepInput, block_size: int,
                                  sp: ParallelGroup, device: torch.device) -> StepBatch:
    """This SP rank's rows of the step (zigzag pieces of prefill chunks, then the replicated
    decode tokens); sample rows are meaningful on SP rank 0, which holds every last token."""
    request_ids = list(step_input.num_scheduled_tokens)
    states = [requests[rid] for rid in request_ids]
    sequences = [StepSequence(state.block_table, state.num_computed_tokens, num_new)
                 for state, num_new in zip(states, step_input.num_scheduled_tokens.values())]
    local = build_local_batch(sequences, [state.token_ids for state in states], block_size, sp, device)
    sampling = [(j, index) for j, index in enumerate(local.order)
                if sequences[index].computed + sequences[index].num_new == len(states[index].token_ids)]
    # Prompt logprobs need every row on one rank: the engine refuses them with SP > 1.
    return StepBatch(local.input_ids, local.metadata.positions, local.metadata,
                     [local.last_row(j) for j, _ in sampling], [request_ids[index] for _, index in sampling], [])
