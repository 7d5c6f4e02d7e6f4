"""A model worker: owns the weights, the KV cache tensors and per-request state on one rank.

Each step it applies the scheduler's `StepInput` (what changed), runs one forward pass over the
flattened batch of scheduled chunks, samples for the requests whose chunk reached their last
known token, and appends those tokens to its own copy of each request's tokens, so that the
driver never re-sends token lists.

With tensor / sequence parallelism (docs/parallelism.md) one worker runs per rank: it holds its
heads (TP) and its stripe of every KV block (SP), computes its share of the step's tokens
(model_shards/parallel/sp_plan.py), and world rank 0 samples and broadcasts the sampled ids, so
that every rank appends the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from array import array
from typing import Callable

import torch

from cluster.config import LongctxConfig
from model_folder.hf_config import load_architecture
from model_shards.attention import resolve_attention_backend
from model_shards.cuda_graphs import DecodeGraphs, DecodeRow
from model_shards.device import host_to_device, resolve_device, resolve_dtype
from model_shards.host_wait import WorkBeforeHostWait
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.kv_transfer import KVTransfer
from model_shards.kv_io.rank_agreement import RankAgreement
from model_shards.llama import LlamaForCausalLM
from model_shards.matmul_warmup import (
    distinct_linears,
    row_count_ladder,
    warm_up_matmuls,
)
from model_shards.parallel.groups import ParallelLayout
from model_shards.parallel.sp_attention import SequenceParallelBackend
from model_shards.prompt_logprobs import compute_prompt_logprobs
from model_shards.sampler import Sampler, SamplingState
from model_shards.step_batch import (
    RequestState,
    StepBatch,
    build_batch,
    build_sequence_parallel_batch,
)
from model_shards.step_containment import ContainedStep, run_contained
from model_shards.structured_output import GrammarCompiler
from model_shards.weights import WeightReader
from protocol.kv_fingerprint import kv_fingerprint
from protocol.kv_transfer_ops import KVTransferReport
from protocol.step import (
    CachedRequestData,
    NewRequestData,
    SampledToken,
    StepInput,
    StepOutput,
)
from protocol.token_ids import token_array
from protocol.worker_description import WorkerDescription

logger = logging.getLogger(__name__)

FAILED_ROW = -1  # the token id broadcast for a row whose sampling failed
# A stepping thread's own cuBLAS and cuDNN workspaces (tens of MiB), with room to spare.
THREAD_WORKSPACE_BYTES = 256 << 20


class ModelWorker:
    def __init__(self, config: LongctxConfig, layout: ParallelLayout | None = None,
                 device: torch.device | None = None):
        """`layout`: this rank's process groups (one rank alone by default); `device`: the one
        the launcher gave this rank (default: the config's)."""
        self.config = config
        self.layout = layout or ParallelLayout.single()
        self.architecture = load_architecture(config.model.path)
        self.device = device or resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.architecture, self.device)
        self.block_size = config.cache.resolved_block_size()
        self.model = self._load_model()
        self._warm_threads: set[int] = set()
        self._warm_up_attention()  # before the KV cache takes the memory its temporaries use
        self._warm_up_matmuls()
        self.kv_cache = self._allocate_kv_cache()
        self._reserve_activation_memory()
        # Host-memory and Redis tiers below the KV cache (None when the config has none).
        # This rank's KV in Redis keys: its own layout, so that keys never mix ranks.
        fingerprint = kv_fingerprint(self.architecture.fingerprint(), self.kv_layout)
        self.kv_transfer = KVTransfer.create(config, self.kv_cache, fingerprint)
        self.rank_agreement = RankAgreement()  # used with several ranks only
        self.sampler = Sampler()
        self.host_wait = WorkBeforeHostWait()  # the engine's overlapped host work, one step's
        self.grammars = GrammarCompiler(config.model.path, self.architecture.vocab_size)
        self.requests: dict[str, RequestState] = {}
        self.decode_graphs = self._capture_decode_graphs()

    def _load_model(self) -> LlamaForCausalLM:
        arch = self.architecture
        backend = resolve_attention_backend(self.config.model.attention_backend, self.device, self.dtype,
                                            self.block_size, arch.head_dim, arch.num_attention_heads,
                                            arch.num_key_value_heads)
        if self.layout.sp.size > 1:
            backend = SequenceParallelBackend(self.layout.sp)
        model = LlamaForCausalLM(
            self.architecture, dtype=self.dtype, device=self.device, attention_backend=backend, tp=self.layout.tp,
            fused_layer_kernels=self.config.model.fused_layer_kernels,
        )
        model.load_weights(WeightReader(self.config.model.path))
        return model.eval()

    def _warm_up_attention(self, release_memory: bool = True) -> None:
        """Per-shape kernel plans built now rather than inside the first request of each prompt
        length (model_shards/attention/chunked_prefill.py). cuDNN keeps plans per thread: a
        worker stepped from another thread than the one that built it (a serving engine's
        thread) warms that thread too, at its first step."""
        self._warm_threads.add(threading.get_ident())
        if self.device.type != "cuda":
            return
        attention = self.model.layers[0].self_attn
        max_model_len = self.config.model.max_model_len or self.architecture.max_position_embeddings
        attention.backend.warm_up(self.device, self.dtype, attention.num_heads, attention.num_kv_heads,
                                  attention.head_dim, self.block_size, self.config.scheduler.max_tokens_per_step,
                                  max_model_len)
        if release_memory:  # not once the activations' reserve is taken (a later thread's warm-up)
            torch.cuda.empty_cache()

    def warm_up_stepping_thread(self) -> None:
        """The calling thread's per-thread kernel plans (cuDNN's), once per thread: a serving
        loop calls it when its thread starts, so that its first request does not pay for them."""
        if threading.get_ident() not in self._warm_threads:
            self._warm_up_attention(release_memory=False)

    def _warm_up_matmuls(self) -> None:
        """Load the GEMM kernels of every step size and compile the fused layer kernels now, not in a
        request (matmul_warmup.py, layer_kernels_triton.py)."""
        if self.device.type != "cuda":
            return
        head = self.model.embed_tokens if self.model.lm_head is None else self.model.lm_head
        layer_weights = [linear.weight for linear in distinct_linears(self.model.layers[0])]
        warm_up_matmuls(layer_weights, row_count_ladder(self.config.scheduler.max_tokens_per_step))
        warm_up_matmuls([head.weight], row_count_ladder(self.config.scheduler.max_num_seqs))
        self.model.layers[0].warm_up_fused_kernels()  # compiled once for every layer and step size
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """Decode steps as CUDA graphs: one GPU rank whose attention backend is graph-safe and
        whose RoPE table is static (model_shards/cuda_graphs.py)."""
        max_batch = min(self.config.model.cuda_graph_max_batch, self.config.scheduler.max_num_seqs)
        graph_safe = self.model.layers[0].self_attn.backend.graph_safe_decode
        if (self.device.type != "cuda" or max_batch == 0 or self.layout.world.size > 1 or not graph_safe
                or self.model.rotary.is_dynamic):
            return None
        max_model_len = self.config.model.max_model_len or self.architecture.max_position_embeddings
        graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_model_len,
                              self.config.scheduler.max_num_seqs)
        graphs.capture()
        return graphs

    def _allocate_kv_cache(self) -> KVCacheTensors:
        # With SP each rank stores 1/sp of every block (its stripe of positions): same block ids
        # as the scheduler's, blocks of block_size / sp slots (model_shards/parallel/sp_plan.py).
        local_block_size = self.block_size // self.layout.sp.size
        bytes_per_block = self.model.kv_bytes_per_block(local_block_size)
        num_blocks = self.config.cache.num_device_blocks or self._kv_budget_bytes() // bytes_per_block
        num_blocks = self.layout.world.min_int(num_blocks)  # one block id space: every rank the same
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({bytes_per_block} bytes a block)")
        return self.model.allocate_kv_cache(num_blocks, local_block_size)

    def _kv_budget_bytes(self) -> int:
        if self.device.type != "cuda":
            return self.config.cache.cpu_kv_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = total * (1 - self.config.cache.device_memory_fraction) + self._activation_bytes + (512 << 20)
        return int(free - reserved)

    @property
    def _activation_bytes(self) -> int:
        """Activations of the largest step (a few (tokens, intermediate) tensors plus the logits),
        and the workspaces of one more stepping thread: cuBLAS and cuDNN keep theirs per thread
        for good, inside this reserve (an H100, session 17: a serving thread's warm-up left a
        step-budget prompt one new segment short)."""
        arch, step_tokens = self.architecture, self.config.scheduler.max_tokens_per_step
        return step_tokens * (4 * arch.intermediate_size + 8 * arch.hidden_size) * 4 + THREAD_WORKSPACE_BYTES

    def _reserve_activation_memory(self) -> None:
        """The memory kept from the KV cache for activations, taken by torch's caching allocator
        now, in one segment that it splits for every step: warm-ups give theirs back
        (empty_cache), so the first prompt of a new size paid cudaMalloc for each new activation
        inside its request (a 32.7K-token prompt's TTFT: 0.132 / 0.178 s the first time against
        0.088 / 0.091 s again, H100, sessions 15-16)."""
        if self.device.type != "cuda":
            return
        try:
            torch.empty(self._activation_bytes, dtype=torch.uint8, device=self.device)  # freed at once, kept cached
        except torch.cuda.OutOfMemoryError:  # a fixed cache.num_device_blocks left less: steps allocate their own
            logger.info("no room to reserve %d bytes of activations ahead of the first steps", self._activation_bytes)

    @property
    def description(self) -> WorkerDescription:
        return WorkerDescription(self.kv_cache.num_blocks, self.kv_layout, self.kv_cache.bytes_per_block,
                                 str(self.dtype).removeprefix("torch."), str(self.device))

    @property
    def kv_layout(self) -> str:
        """What this rank's KV blocks hold: dtype, block size, the parallel layout and this rank's
        place in it (its KV heads and its stripe of positions), so that tier keys built from it
        never mix ranks."""
        tp, sp = self.layout.tp, self.layout.sp
        return f"dtype={self.dtype}|block={self.block_size}|tp={tp.size}|sp={sp.size}|{self.layout.describe()}"

    def close(self) -> None:
        """Stop the Redis I/O threads and connections and the grammar thread (the KV tensors go
        with the worker)."""
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.grammars.close()

    # --- one step --------------------------------------------------------------------------
    def execute(self, step_input: StepInput, while_running: Callable[[], None] | None = None) -> StepOutput:
        """One step. `while_running()` (the engine's text of the step before) runs once, at the
        step's first wait for the device (its kernels queued), or at the step's end."""
        return self.host_wait.around(while_running, lambda: self._execute(step_input))

    @torch.inference_mode()
    def _execute(self, step_input: StepInput) -> StepOutput:
        """One step. A request whose own handling fails (its sampling state, its forward pass:
        model_shards/step_containment.py, its sample) is left out and reported in `failed`; the
        other requests of the step go on as if it were absent."""
        self.warm_up_stepping_thread()
        failed: dict[str, str] = {}
        self._apply_changes(step_input, failed)
        kv_report = self._transfer_kv(step_input)  # before the forward pass overwrites evicted blocks
        step_input = _without(step_input, failed)
        if not step_input.num_scheduled_tokens:
            return StepOutput(step_input.step_id, kv_report=kv_report, failed=failed)
        sampled, prompt_logprobs = {}, {}
        for schedule, (hidden, batch) in self._contained_forward(step_input, failed):  # hidden: (tokens, hidden)
            prompt_logprobs.update(compute_prompt_logprobs(hidden, batch.prompt_rows, self.model.compute_logits,
                                                           keep=self.layout.is_driver_rank,
                                                           before_sync=self.host_wait.run))
            sampled.update(self._sample(hidden, batch, failed))
            self._advance(schedule)
        prompt_logprobs = {rid: chunk for rid, chunk in prompt_logprobs.items() if rid not in failed}
        return StepOutput(step_input.step_id, sampled, kv_report=kv_report, prompt_logprobs=prompt_logprobs,
                          failed=failed)

    def _contained_forward(self, step_input: StepInput, failed: dict[str, str]) -> list:
        """(schedule, (hidden, batch)) per group that ran (nothing to rewind: KV is slot-addressed)."""
        step = ContainedStep(lambda schedule: self._run_model(_with_schedule(step_input, schedule)),
                             lambda request_id: self.requests[request_id].num_computed_tokens)
        return run_contained(step, dict(step_input.num_scheduled_tokens), failed, world_size=self.layout.world.size,
                             device=self.device)

    def _run_model(self, step_input: StepInput) -> tuple[torch.Tensor, StepBatch]:
        """A step's decodes replay a CUDA graph when one fits; its prompt chunks run eagerly after
        them (the host launches those while the GPU runs the graph). A step the graphs cannot take
        runs wholly eager."""
        schedule = step_input.num_scheduled_tokens
        decoding = self._graphed_decodes(schedule)
        graphed = self._replay_decodes(decoding) if decoding else None
        if graphed is None:
            return self._run_eager(step_input)
        if len(decoding) == len(schedule):
            return graphed
        taken = set(decoding)
        rest = _with_schedule(step_input, {rid: num for rid, num in schedule.items() if rid not in taken})
        return _joined(graphed, self._run_eager(rest))

    def _graphed_decodes(self, schedule: dict[str, int]) -> list[str]:
        """The requests whose row of this step the decode graphs take: all of a step of single
        tokens; in a step with prompt chunks of at most `mixed_step_graph_max_prompt_tokens`,
        the single-token rows that sample (decodes; such a row predicts no prompt token)."""
        if self.decode_graphs is None:
            return []
        single = [rid for rid, num in schedule.items() if num == 1]
        if len(single) == len(schedule):
            return single
        prompt_tokens = sum(num for num in schedule.values() if num > 1)
        if not single or prompt_tokens > self.config.model.mixed_step_graph_max_prompt_tokens:
            return []
        return [rid for rid in single
                if self.requests[rid].num_computed_tokens + 1 == len(self.requests[rid].token_ids)]

    def _replay_decodes(self, request_ids: list[str]) -> tuple[torch.Tensor, StepBatch] | None:
        """(hidden (rows, hidden), batch) of one graph replay; None when no graph takes the rows."""
        rows = [self._decode_row(rid) for rid in request_ids]
        hidden = self.decode_graphs.run(rows)
        if hidden is None:
            return None
        sampling = [j for j, row in enumerate(rows) if row.position + 1 == len(self.requests[row.request_id].token_ids)]
        # A decode row predicts no prompt token: no prompt logprobs here.
        return hidden, StepBatch(None, None, None, sampling, [rows[j].request_id for j in sampling], [])

    def _run_eager(self, step_input: StepInput) -> tuple[torch.Tensor, StepBatch]:
        batch = self._build_batch(step_input)
        return self.model(batch.input_ids, batch.positions, batch.metadata, self.kv_cache), batch

    def _decode_row(self, request_id: str) -> DecodeRow:
        state = self.requests[request_id]
        position = state.num_computed_tokens
        return DecodeRow(request_id, state.token_ids[position], position, state.block_table)

    def _transfer_kv(self, step_input: StepInput) -> KVTransferReport | None:
        if step_input.kv_transfers is None or self.kv_transfer is None:
            return None  # the same on every rank: they all get this StepInput and one host size
        report = self.kv_transfer.run(step_input.kv_transfers)
        if self.layout.world.size == 1:
            return report
        return self._agree_across_ranks(report)

    def _agree_across_ranks(self, report: KVTransferReport) -> KVTransferReport:
        """Each rank moved its own shard of the blocks: report a remote outcome only once every
        rank has it, merged (model_shards/kv_io/rank_agreement.py)."""
        return self.rank_agreement.across(self.layout.world, report)

    def _apply_changes(self, step_input: StepInput, failed: dict[str, str]) -> None:
        for request_id in step_input.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in step_input.new_requests:
            try:  # e.g. a seed no generator takes: that request fails, not the step
                self.requests[new.request_id] = self._new_state(new)
            except Exception as error:  # noqa: BLE001 - reported to the engine, which aborts the request
                failed[new.request_id] = f"its sampling state could not be built: {error!r}"
        if self.decode_graphs is not None:  # a rebuilt request brings a new block table
            rebuilt = [new.request_id for new in step_input.new_requests]
            for request_id in [*step_input.finished_request_ids, *rebuilt]:
                self.decode_graphs.release(request_id)
        for cached in step_input.cached_requests:
            self._update_state(cached)

    def _new_state(self, new: NewRequestData) -> RequestState:
        params = new.sampling_params
        # Only the rank that samples keeps a grammar (it compiles meanwhile, off this thread).
        grammar = (self.grammars.request_grammar(params.structured_output, new.output_token_ids)
                   if params.structured_output is not None and self.layout.is_driver_rank else None)
        sampling = SamplingState(params, new.prompt_token_ids, new.output_token_ids, self.device, grammar)
        token_ids = token_array(new.prompt_token_ids)[:]  # protocol/token_ids.py: no list for the collector
        token_ids.extend(new.output_token_ids)
        # A dense model keeps one KV block group (a hybrid model's worker reads the others).
        return RequestState(token_ids, array("q", new.block_ids[0]), new.num_computed_tokens, sampling,
                             len(new.prompt_token_ids))

    def _update_state(self, cached: CachedRequestData) -> None:
        state = self.requests[cached.request_id]
        state.block_table.extend(cached.new_block_ids[0])
        if state.num_computed_tokens != cached.num_computed_tokens:
            raise RuntimeError(
                f"request {cached.request_id}: worker computed {state.num_computed_tokens} tokens, "
                f"scheduler says {cached.num_computed_tokens}"
            )

    def _build_batch(self, step_input: StepInput) -> StepBatch:
        if self.layout.sp.size > 1:
            return build_sequence_parallel_batch(self.requests, step_input, self.block_size, self.layout.sp,
                                                 self.device)
        return build_batch(self.requests, step_input, self.block_size, self.device)

    def _sample(self, hidden: torch.Tensor, batch: StepBatch, failed: dict[str, str]) -> dict:
        if not batch.sample_rows:
            return {}
        tokens = self._sample_on_rank_zero(hidden, batch, failed)  # None on every other rank
        # A row whose sampling failed travels as -1: every rank drops that request alike.
        sent = [FAILED_ROW if t is None else t.token_id for t in tokens] if tokens is not None else None
        token_ids = self.layout.world.broadcast_ints(sent, len(batch.sample_rows))
        sampled = {}
        for row, (request_id, token_id) in enumerate(zip(batch.sample_request_ids, token_ids)):
            if token_id == FAILED_ROW:
                failed.setdefault(request_id, "its sampling failed on rank 0")
                del self.requests[request_id]
                continue
            self.requests[request_id].token_ids.append(token_id)
            self.requests[request_id].sampling.append(token_id)
            if tokens is not None:
                sampled[request_id] = tokens[row]
        return sampled

    def _sample_on_rank_zero(self, hidden: torch.Tensor, batch: StepBatch, failed: dict[str, str]) -> list | None:
        """Logits on SP rank 0 (where the sampled rows are; a collective over its TP group),
        sampling on world rank 0 only: unseeded requests draw from one RNG, not one per rank."""
        if self.layout.sp.rank != 0:
            return None
        rows = host_to_device(torch.tensor(batch.sample_rows), self.device)  # queued, not waited for
        logits = self.model.compute_logits(hidden[rows])  # (sampling requests, vocab) float32
        if not self.layout.is_driver_rank:
            return None
        states = [self.requests[rid].sampling for rid in batch.sample_request_ids]
        try:
            return self.sampler(logits, states, before_sync=self.host_wait.run)
        except Exception:  # noqa: BLE001 - find the rows at fault; the others still get their token
            return [self._sample_row(logits[row : row + 1], state, request_id, failed)
                    for row, (state, request_id) in enumerate(zip(states, batch.sample_request_ids))]

    def _sample_row(self, logits: torch.Tensor, state: SamplingState, request_id: str,
                    failed: dict[str, str]) -> SampledToken | None:
        """One row alone, after the batch failed. The stages before the final draw consume no
        random numbers, so a seeded row that failed only because of another draws what it would
        have drawn in the batch."""
        try:
            return self.sampler(logits, [state])[0]
        except Exception as error:  # noqa: BLE001 - reported to the engine, which aborts the request
            failed[request_id] = f"its sampling failed: {error!r}"
            return None

    def _advance(self, schedule: dict[str, int]) -> None:
        for request_id, num_new in schedule.items():
            state = self.requests.get(request_id)  # None: it failed in sampling and was dropped
            if state is not None:
                state.num_computed_tokens += num_new


def _without(step_input: StepInput, failed: dict[str, str]) -> StepInput:
    """The step minus the requests that failed before the forward pass."""
    if not failed:
        return step_input
    return _with_schedule(step_input, {rid: num for rid, num in step_input.num_scheduled_tokens.items()
                                       if rid not in failed})


def _with_schedule(step_input: StepInput, schedule: dict[str, int]) -> StepInput:
    return dataclasses.replace(step_input, num_scheduled_tokens=schedule)


def _joined(first: tuple[torch.Tensor, StepBatch],
            second: tuple[torch.Tensor, StepBatch]) -> tuple[torch.Tensor, StepBatch]:
    """Two parts of one step as one: hidden states stacked (first's rows, then second's), every
    row index of the second shifted past the first's. The first part must score no prompt rows."""
    (first_hidden, first_batch), (second_hidden, second_batch) = first, second
    offset = first_hidden.shape[0]
    prompt_rows = [dataclasses.replace(rows, first_row=rows.first_row + offset) for rows in second_batch.prompt_rows]
    batch = StepBatch(None, None, None, first_batch.sample_rows + [row + offset for row in second_batch.sample_rows],
                      first_batch.sample_request_ids + second_batch.sample_request_ids,
                      first_batch.prompt_rows + prompt_rows)
    return torch.cat([first_hidden, second_hidden]), batch
