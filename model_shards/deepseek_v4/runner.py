"""The worker side of DeepSeek-V4: runs the engine's steps (protocol/step.py) on the V4 model.

Per request it keeps the tokens, one block table per KV-cache block group (compressed, window),
the sampler state and a small slot with the open compression windows; the KV itself lives in
the rank's pages (kv_pages.py), read into the model's SequenceState before each chunk and written
through while it runs (paged_state.py). Every request's chunk of a step runs in one forward pass
(model.forward_segments: the expert and mHC weights are read once a step); world rank 0 samples,
every rank appends the same tokens, so the driver never re-sends them. A request arriving with
num_computed_tokens > 0 (a prefix-cache hit, on a block boundary) reads its prefix from the pages.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable

import torch

from model_shards.deepseek_v4.contained_chunks import contained_chunks
from model_shards.deepseek_v4.decode_graphs import DeepseekV4DecodeGraphs
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, PagedDecode
from model_shards.deepseek_v4.paged_state import BlockTableMirror, PagedKV
from model_shards.deepseek_v4.sequence_split import SequenceSplit
from model_shards.device import host_to_device
from model_shards.host_wait import WorkBeforeHostWait
from model_shards.parallel.groups import ParallelLayout
from model_shards.prompt_logprobs import compute_prompt_logprobs, prompt_rows
from model_shards.sampler import Sampler, SamplingState
from model_shards.step_containment import run_contained
from model_shards.structured_output import GrammarCompiler
from protocol.step import (
    CachedRequestData,
    NewRequestData,
    PromptLogprobs,
    SampledToken,
    StepInput,
    StepOutput,
)
from protocol.token_ids import token_array


@dataclass
class _Request:
    token_ids: array  # ('q') prompt + outputs, grows by the tokens this runner samples (protocol/token_ids.py)
    block_ids: list[list[int]]  # (compressed, window) block tables; the window's holds -1 where freed
    num_computed_tokens: int  # as the scheduler counts them
    sampling: SamplingState
    device_tables: list[BlockTableMirror]  # block_ids on the pools' device, kept between steps
    slot: int  # its open windows (open_windows.py; entries and keys are in pages)
    num_prompt_tokens: int


class DeepseekV4Runner:
    def __init__(self, model: DeepseekV4ForCausalLM, pages: PagedKV, layout: ParallelLayout | None = None,
                 grammars: GrammarCompiler | None = None, decode_graphs: DeepseekV4DecodeGraphs | None = None,
                 split_min_tokens: int = 1024):
        """`grammars`: compiles structured-output grammars (None: requests ask for none);
        `decode_graphs`: runs the steps in which every request decodes (None: all eagerly);
        `split_min_tokens`: under sequence parallelism, a chunk is split over the SP ranks when
        each gets at least this many of its tokens (sequence_split.py)."""
        self.model, self.pages, self.grammars, self.decode_graphs = model, pages, grammars, decode_graphs
        self.layout = layout or ParallelLayout.single()
        self.split_min_tokens = split_min_tokens
        self.sampler = Sampler()
        self.host_wait = WorkBeforeHostWait()  # the engine's overlapped host work, one step's
        self.requests: dict[str, _Request] = {}

    def execute(self, step_input: StepInput, while_running: Callable[[], None] | None = None) -> StepOutput:
        """One step. `while_running()` (the engine's text of the step before) runs once, at the
        step's first wait for the device (its kernels queued), or at the step's end."""
        return self.host_wait.around(while_running, lambda: self._execute(step_input))

    @torch.inference_mode()
    def _execute(self, step_input: StepInput) -> StepOutput:
        self._apply_changes(step_input)
        failed: dict[str, str] = {}
        sampled: dict[str, SampledToken] = {}
        prompt_logprobs: dict[str, PromptLogprobs] = {}
        # A forward pass that raises fails its culprits alone (model_shards/step_containment.py).
        for schedule, hidden in self._contained_chunks(dict(step_input.num_scheduled_tokens), failed):
            prompt_logprobs.update(self._prompt_logprobs(schedule, hidden))  # before the chunks count as computed
            sampled.update(self._advance_and_sample(schedule, hidden))
        return StepOutput(step_input.step_id, sampled, failed=failed, prompt_logprobs=prompt_logprobs)

    def _contained_chunks(self, schedule: dict[str, int], failed: dict[str, str]) -> list:
        """(schedule, hidden) per group that ran: the whole step unless its forward raised."""
        if not schedule:
            return []
        forward = lambda group: self._run_chunks([(self.requests[rid], count) for rid, count in group.items()])
        step = contained_chunks(self.requests, schedule, self.pages.open_windows, forward)
        return run_contained(step, schedule, failed, world_size=self.layout.world.size, device=self.model.device)

    def _split(self, counts: list[int]) -> SequenceSplit | None:
        """The step's chunks split over the SP ranks: a function of the schedule alone, so every
        rank, and every use within a step, gets the same one."""
        return SequenceSplit.plan(self.layout.sp, counts, self.split_min_tokens)

    def _prompt_logprobs(self, schedule: dict[str, int], hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Logprobs of the prompt tokens that `schedule`'s chunks predict, for the requests that
        asked (echo + logprobs): the rows of `hidden` (scheduled tokens, hidden) the step computed
        anyway. Every TP rank computes the logits (a collective); world rank 0 keeps the results.
        (The engine refuses them under sequence parallelism: a rank holds a piece of each chunk.)"""
        spans, row = [], 0
        for request_id, count in schedule.items():
            request = self.requests[request_id]
            spans.append(prompt_rows(request_id, row, request.num_computed_tokens, count, request.token_ids,
                                     request.num_prompt_tokens, request.sampling.params.prompt_logprobs))
            row += count
        spans = [span for span in spans if span is not None]
        return compute_prompt_logprobs(hidden, spans, self.model.compute_logits, keep=self.layout.is_driver_rank,
                                       before_sync=self.host_wait.run)

    def _advance_and_sample(self, schedule: dict[str, int], hidden: torch.Tensor) -> dict[str, SampledToken]:
        """hidden: (this rank's rows, hidden) of `schedule`'s chunks, in order. A split chunk's last
        row is on SP rank 0 (sequence_split.py), the rank whose rows are sampled."""
        last_rows, sampling_ids, row = [], [], 0
        split = self._split(list(schedule.values()))
        for index, (request_id, count) in enumerate(schedule.items()):
            request = self.requests[request_id]
            row += count if split is None else split.local_count(index, count)
            request.num_computed_tokens += count
            if request.num_computed_tokens == len(request.token_ids):
                last_rows.append(row - 1)
                sampling_ids.append(request_id)
        if not sampling_ids:
            return {}
        last_hidden = None
        if self.layout.sp.rank == 0:
            last_hidden = hidden.index_select(0, host_to_device(torch.tensor(last_rows), hidden.device))
        return self._sample(last_hidden, sampling_ids)

    def _apply_changes(self, step_input: StepInput) -> None:
        for request_id in step_input.finished_request_ids:
            self._drop(request_id)
        for new in step_input.new_requests:  # new, or rebuilt after a preemption: a fresh state
            self._drop(new.request_id)
            self.requests[new.request_id] = self._new_request(new)
        for cached in step_input.cached_requests:
            self._update_request(cached)

    def _drop(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.pages.open_windows.release(request.slot)
            if self.decode_graphs is not None:
                self.decode_graphs.release(request.slot)

    def _new_request(self, new: NewRequestData) -> _Request:
        params = new.sampling_params
        # Only the rank that samples keeps a grammar (it compiles meanwhile, off this thread).
        grammar = (self.grammars.request_grammar(params.structured_output, new.output_token_ids)
                   if params.structured_output is not None and self.layout.is_driver_rank else None)
        sampling = SamplingState(params, new.prompt_token_ids, new.output_token_ids, self.model.device, grammar)
        token_ids = token_array(new.prompt_token_ids)[:]  # a copy: this runner appends its samples
        token_ids.extend(new.output_token_ids)
        return _Request(token_ids, [list(g) for g in new.block_ids],
                        new.num_computed_tokens, sampling,
                        [BlockTableMirror(self.pages.compressed.device) for _ in new.block_ids],
                        self.pages.open_windows.take(self.model.new_state), len(new.prompt_token_ids))

    def _update_request(self, cached: CachedRequestData) -> None:
        request = self.requests[cached.request_id]
        for table, new_ids in zip(request.block_ids, cached.new_block_ids):
            table.extend(new_ids)
        if request.num_computed_tokens != cached.num_computed_tokens:
            raise RuntimeError(f"request {cached.request_id}: runner computed {request.num_computed_tokens} tokens, "
                               f"scheduler says {cached.num_computed_tokens}")

    def _run_chunks(self, scheduled: list[tuple[_Request, int]]) -> torch.Tensor:
        """Hidden states (scheduled tokens, hidden) of every request's chunk, in order, from one
        forward pass; their KV lands in the pages. A single token whose open windows are in the
        request's slot decodes on the pages with the step's others (paged_decodes.py); any other
        chunk runs on a SequenceState loaded from the pages and its slot, saved back after. A
        step of such decodes only replays a captured graph when there is one (decode_graphs.py)."""
        hidden = self._replay_decodes(scheduled)
        if hidden is not None:
            return hidden
        segments, decodes, decode_rows, row = [], [], [], 0
        split = self._split([count for _, count in scheduled])
        step_ids = self._step_ids(scheduled, split)  # (this rank's scheduled tokens,)
        for index, (request, count) in enumerate(scheduled):
            start = request.num_computed_tokens
            local_count = count if split is None else split.local_count(index, count)
            ids = step_ids[row:row + local_count]
            tables = [mirror.update(table) for mirror, table in zip(request.device_tables, request.block_ids)]
            if count == 1 and self.pages.open_windows.holds(request.slot, start):
                decodes.append(PagedDecode(start, request.slot, tuple(request.block_ids), tables[0]))
                segments.append((ids, None))
                decode_rows.append(row)
            else:
                segments.append((ids, self.pages.load(self.model.new_state, request.block_ids, start, request.slot,
                                                      tables)))
            row += local_count
        batch = decodes and DecodeBatch(self.pages, self.model.arch.sliding_window, decodes,
                                        None if len(decodes) == row else decode_rows, row)
        hidden = self.model.forward_segments(segments, batch or None, split)
        for (request, _), (_, state) in zip(scheduled, segments):
            if state is not None:
                self.pages.save(state, request.slot)
        return hidden

    def _replay_decodes(self, scheduled: list[tuple[_Request, int]]) -> torch.Tensor | None:
        """(N, hidden) of a step whose every request decodes from its slot, by the decode graphs;
        None when there are none, the step is not one, or it does not fit them."""
        holds = self.pages.open_windows.holds
        if self.decode_graphs is None or any(count != 1 or not holds(request.slot, request.num_computed_tokens)
                                             for request, count in scheduled):
            return None
        decodes = [PagedDecode(request.num_computed_tokens, request.slot, tuple(request.block_ids), None)
                   for request, _ in scheduled]  # the graphs keep the compressed tables themselves
        return self.decode_graphs.run([request.slot for request, _ in scheduled], decodes,
                                      [request.token_ids[request.num_computed_tokens] for request, _ in scheduled])

    def _step_ids(self, scheduled: list[tuple[_Request, int]], split: SequenceSplit | None) -> torch.Tensor:
        """This rank's scheduled token ids (all of them, or its piece of a split chunk), in order,
        as one tensor: one copy to the device a step."""
        ids = []
        for index, (request, count) in enumerate(scheduled):
            first, stop = split.rows(index) if split is not None and index in split.pieces else (0, count)
            ids += request.token_ids[request.num_computed_tokens + first:request.num_computed_tokens + stop]
        return host_to_device(torch.tensor(ids, dtype=torch.long), self.model.device)  # no wait for the last step

    def _sample(self, last_hidden: torch.Tensor | None, request_ids: list[str]) -> dict[str, SampledToken]:
        """Logits on the TP ranks of SP rank 0 (a collective among them; the other SP ranks do not
        hold split chunks' last rows), sampling on world rank 0, the ids broadcast."""
        tokens = None
        if self.layout.sp.rank == 0:
            logits = self.model.compute_logits(last_hidden)  # (sampling requests, vocab) float32
        if self.layout.is_driver_rank:
            tokens = self.sampler(logits, [self.requests[rid].sampling for rid in request_ids],
                                  before_sync=self.host_wait.run)
        token_ids = self.layout.world.broadcast_ints([t.token_id for t in tokens] if tokens else None,
                                                     len(request_ids))
        for request_id, token_id in zip(request_ids, token_ids):
            self.requests[request_id].token_ids.append(token_id)
            self.requests[request_id].sampling.append(token_id)
        return dict(zip(request_ids, tokens)) if tokens else {}
