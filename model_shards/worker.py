"""A model worker: owns the weights, the KV cache tensors and per-request state on one rank.

Each step it applies the scheduler's `StepInput` (what changed), runs one forward pass over the
flattened batch of scheduled chunks, samples for the requests whose chunk reached their last
known token, and appends those tokens to its own copy of each request's tokens, so that the
driver never re-sends token lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.config import LongctxConfig
from engine.sampler import Sampler, SamplingState
from engine.step import CachedRequestData, NewRequestData, StepInput, StepOutput
from model_shards.attention.base import AttentionMetadata
from model_shards.device import resolve_device, resolve_dtype
from model_shards.hf_config import load_architecture
from model_shards.kv_cache import KVCacheTensors
from model_shards.llama import LlamaForCausalLM
from model_shards.weights import WeightReader


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + outputs, grows by the tokens this worker samples
    block_table: list[int]
    num_computed_tokens: int
    sampling: SamplingState


@dataclass
class _Batch:
    """One step's flattened inputs. Rows of `input_ids` are the scheduled chunks, back to back."""

    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    metadata: AttentionMetadata
    sample_rows: list[int]  # row of the last token of each sampling request
    sample_request_ids: list[str]


class ModelWorker:
    def __init__(self, config: LongctxConfig):
        self.config = config
        self.architecture = load_architecture(config.model.path)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.architecture, self.device)
        self.block_size = config.cache.block_size
        self.model = self._load_model()
        self.kv_cache = self._allocate_kv_cache()
        self.sampler = Sampler()
        self.requests: dict[str, _RequestState] = {}

    def _load_model(self) -> LlamaForCausalLM:
        model = LlamaForCausalLM(
            self.architecture, dtype=self.dtype, device=self.device, attention_backend=self.config.model.attention_backend
        )
        model.load_weights(WeightReader(self.config.model.path))
        return model.eval()

    def _allocate_kv_cache(self) -> KVCacheTensors:
        arch = self.architecture
        bytes_per_block = KVCacheTensors.bytes_per_block_for(arch, self.block_size, self.dtype)
        num_blocks = self.config.cache.num_device_blocks or self._kv_budget_bytes() // bytes_per_block
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({bytes_per_block} bytes a block)")
        return self.model.allocate_kv_cache(num_blocks, self.block_size)

    def _kv_budget_bytes(self) -> int:
        if self.device.type != "cuda":
            return self.config.cache.cpu_kv_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        # Activations of the largest step: a few (tokens, intermediate) tensors plus the logits.
        arch, step_tokens = self.architecture, self.config.scheduler.max_tokens_per_step
        activation_bytes = step_tokens * (4 * arch.intermediate_size + 8 * arch.hidden_size) * 4
        reserved = total * (1 - self.config.cache.device_memory_fraction) + activation_bytes + (512 << 20)
        return int(free - reserved)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def kv_layout(self) -> str:
        return f"dtype={self.dtype}|block={self.block_size}|tp=1|sp=1"

    # --- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step_input: StepInput) -> StepOutput:
        self._apply_changes(step_input)
        if not step_input.num_scheduled_tokens:
            return StepOutput(step_input.step_id)
        batch = self._build_batch(step_input)
        hidden = self.model(batch.input_ids, batch.positions, batch.metadata, self.kv_cache)  # (tokens, hidden)
        sampled = self._sample(hidden, batch)
        self._advance(step_input)
        return StepOutput(step_input.step_id, sampled)

    def _apply_changes(self, step_input: StepInput) -> None:
        for request_id in step_input.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in step_input.new_requests:
            self.requests[new.request_id] = self._new_state(new)
        for cached in step_input.cached_requests:
            self._update_state(cached)

    def _new_state(self, new: NewRequestData) -> _RequestState:
        sampling = SamplingState(new.sampling_params, new.prompt_token_ids, new.output_token_ids, device=self.device)
        token_ids = list(new.prompt_token_ids) + list(new.output_token_ids)
        return _RequestState(token_ids, list(new.block_ids), new.num_computed_tokens, sampling)

    def _update_state(self, cached: CachedRequestData) -> None:
        state = self.requests[cached.request_id]
        state.block_table.extend(cached.new_block_ids)
        if state.num_computed_tokens != cached.num_computed_tokens:
            raise RuntimeError(
                f"request {cached.request_id}: worker computed {state.num_computed_tokens} tokens, "
                f"scheduler says {cached.num_computed_tokens}"
            )

    def _build_batch(self, step_input: StepInput) -> _Batch:
        token_ids: list[int] = []
        positions: list[int] = []
        sequences, sample_rows, sample_ids = [], [], []
        for request_id, num_new in step_input.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            token_ids.extend(state.token_ids[start : start + num_new])
            positions.extend(range(start, start + num_new))
            sequences.append((state.block_table, start, num_new))
            if start + num_new == len(state.token_ids):
                sample_rows.append(len(token_ids) - 1)
                sample_ids.append(request_id)
        return _Batch(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            metadata=AttentionMetadata.build(sequences, self.block_size, self.device),
            sample_rows=sample_rows,
            sample_request_ids=sample_ids,
        )

    def _sample(self, hidden: torch.Tensor, batch: _Batch) -> dict:
        if not batch.sample_rows:
            return {}
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # (sampling requests, vocab) float32
        states = [self.requests[rid].sampling for rid in batch.sample_request_ids]
        tokens = self.sampler(logits, states)
        for request_id, token in zip(batch.sample_request_ids, tokens):
            self.requests[request_id].token_ids.append(token.token_id)
            self.requests[request_id].sampling.append(token.token_id)
        return dict(zip(batch.sample_request_ids, tokens))

    def _advance(self, step_input: StepInput) -> None:
        for request_id, num_new in step_input.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += num_new
