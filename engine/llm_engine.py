"""The synchronous engine: add requests, step, read deltas. One step = schedule -> execute -> output.

Threading: an LLMEngine is used by one thread (the async engine runs it on its own loop thread).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from cluster.config import LongctxConfig
from engine.calibration import calibrate_restore_estimates
from engine.backlog import measure_backlog
from engine.output_processor import SequenceOutput
from engine.overlapped_work import OverlappedWork
from engine.outputs import CompletionDelta, EngineStats
from engine.request import Request, RequestStatus
from engine.request_preparer import ContextLengthExceededError, PreparedRequest, RequestLimits, RequestPreparer
from engine.scheduler import Scheduler
from engine.step_metrics import StepMetrics
from engine.progress import PrefillProgressLog
from engine.summary import EngineSummary, redis_shard_names
from executors import Executor, create_executor, executor_backend
from kvcache.block_groups import extra_group_specs
from kvcache.coordinator import KVCacheCoordinator
from kvcache.tiers.cost_model import PrefillFlops
from model_folder.hf_config import load_architecture
from model_folder.tokenizer import Tokenizer
from protocol.kv_fingerprint import kv_fingerprint
from protocol.sampling_params import InvalidParameterError, SamplingParams
from protocol.step import PromptLogprobs, SampledToken, StepInput, StepOutput

logger = logging.getLogger(__name__)

# Raised and returned here; defined beside the preparation that a replica may run on its own.
__all__ = ["ContextLengthExceededError", "LLMEngine", "PreparedRequest"]

SEED_MODULUS = 2**64  # torch generators take 64-bit seeds; n > 1 seeds seed + index wrap around


@dataclass
class _Sequence:
    """The engine's bookkeeping for one of a request's n sequences."""

    request: Request
    user_request_id: str
    index: int
    output: SequenceOutput
    first_token_time: float | None = None
    pending_logprobs: list[SampledToken] = field(default_factory=list)
    # Of prompt positions 1, 2, ...; None once handed out with the first delta.
    prompt_logprobs: list[SampledToken] | None = field(default_factory=list)

    def absorb_prompt_logprobs(self, chunk: PromptLogprobs) -> None:
        """A recomputed chunk (after a preemption) repeats positions already held: those are skipped."""
        if self.prompt_logprobs is None:
            return
        already = len(self.prompt_logprobs) + 1 - chunk.first_position
        self.prompt_logprobs.extend(chunk.tokens[max(0, already) :])


@dataclass(frozen=True)
class _SampledText:
    """A sampled token whose text is still to be made. `finish_status`: what the checks without
    text gave (when set, the scheduler has ended the request); `num_kv_blocks`: the request's KV
    blocks when the token was taken (its delta reports them); `is_first`: the sequence's first."""

    sequence: _Sequence
    token: SampledToken
    finish_status: RequestStatus | None
    num_kv_blocks: int
    is_first: bool


class LLMEngine:
    def __init__(self, config: LongctxConfig, executor: Executor | None = None):
        start = time.perf_counter()
        self.architecture = load_architecture(config.model.path)
        # The block size, resolved once for this model (DeepSeek-V4: whole compression windows).
        config = self.config = config.for_model(self.architecture.kv_block_multiple)
        self.architecture.check_tensor_parallel(config.parallel.tensor_parallel_size)  # before any rank starts
        self.tokenizer = Tokenizer.from_folder(config.model.path)
        self.max_model_len = config.model.max_model_len or self.architecture.max_position_embeddings
        self.executor = executor or create_executor(config)
        self.block_size = config.cache.block_size
        # Device blocks, prefix cache, host and Redis tiers; metrics in this engine's own registry.
        extra_groups = zip(extra_group_specs(self.architecture), self.executor.description.extra_group_blocks)
        self.kv_cache = KVCacheCoordinator.from_config(config, self.executor.description,
                                                       flops=PrefillFlops.of(self.architecture),
                                                       extra_groups=tuple(extra_groups))
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        # Restore-or-recompute estimates measured on this machine before the first request.
        calibrate_restore_estimates(config, self.executor, self.kv_cache, self.architecture.vocab_size,
                                    self.max_model_len)
        self.model_fingerprint = kv_fingerprint(self.architecture.fingerprint(), self.executor.kv_layout)
        self.preparer = RequestPreparer(self.tokenizer, self._request_limits())
        self._sequences: dict[str, _Sequence] = {}  # internal (per-sequence) id -> state
        self._request_groups: dict[str, list[str]] = {}  # caller's id -> internal ids
        self.prefill_progress = PrefillProgressLog()
        self._unmade_text: OverlappedWork | None = None  # the last step's, with scheduler.overlap_outputs
        self.step_metrics = StepMetrics(self.kv_cache.metrics.registry)  # exported with the tiers' series
        self.load_seconds = time.perf_counter() - start

    def _request_limits(self) -> RequestLimits:
        config = self.config
        return RequestLimits(
            vocab_size=self.architecture.vocab_size, max_model_len=self.max_model_len, block_size=self.block_size,
            num_kv_blocks=self.kv_cache.num_blocks, max_waiting_requests=config.scheduler.max_waiting_requests,
            sequence_parallel_size=config.parallel.sequence_parallel_size,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids), model_fingerprint=self.model_fingerprint,
        )  # fmt: skip

    # --- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> None:
        """Queue the request's n sequences, all or none: a refusal (400, 429) leaves nothing behind."""
        self.add_prepared(self.prepare_request(request_id, prompt, params, cache_salt))

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                        cache_salt: str | None = None) -> PreparedRequest:  # fmt: skip
        """The request's own work, before it meets the engine's state (engine/request_preparer.py):
        tokenize, check against the model and the cache's size, name the prompt's full blocks."""
        return self.preparer.prepare(request_id, prompt, params, cache_salt)

    def add_prepared(self, prepared: PreparedRequest) -> None:
        """Queue a prepared request's n sequences, all or none (the queue's room, a duplicate id)."""
        request_id, params = prepared.request_id, prepared.params
        if request_id in self._request_groups:
            raise InvalidParameterError("request_id", f"request {request_id!r} is already running")
        self.scheduler.check_room(params.n)  # the whole group, up front
        internal_ids = self._request_groups[request_id] = []
        try:
            for index in range(params.n):
                internal_id = request_id if params.n == 1 else f"{request_id}#{index}"
                self._add_sequence(internal_id, request_id, index, prepared, self._sequence_params(params, index))
                internal_ids.append(internal_id)
        except BaseException:
            self.abort_request(request_id)
            self._request_groups.pop(request_id, None)
            raise

    @staticmethod
    def _sequence_params(params: SamplingParams, index: int) -> SamplingParams:
        # n > 1: each sequence samples on its own, seeded with seed + index when a seed is given.
        seed = None if params.seed is None else (params.seed + index) % SEED_MODULUS
        return dataclasses.replace(params, n=1, seed=seed)

    def _add_sequence(self, internal_id, user_id, index, prepared: PreparedRequest, params) -> None:
        request = Request(internal_id, prepared.token_ids, params, prepared.chain_root, self.block_size,
                          known_block_hashes=prepared.block_hashes)  # fmt: skip
        output = SequenceOutput(request, self.tokenizer, self.max_model_len)
        self.scheduler.add_request(request)
        self._sequences[internal_id] = _Sequence(request, user_id, index, output)

    def abort_request(self, request_id: str) -> list[CompletionDelta]:
        """Abort all sequences of a caller's request; their blocks are freed now."""
        deltas = []
        for internal_id in list(self._request_groups.get(request_id, ())):  # _finish shrinks the group
            sequence = self._sequences.get(internal_id)
            if sequence is not None:
                deltas.append(self._finish(sequence, RequestStatus.FINISHED_ABORTED, "", ()))
        return deltas

    def num_open_requests(self) -> int:
        """Callers' requests added and not yet finished or aborted (a request of n sequences is one)."""
        return len(self._request_groups)

    def has_unfinished_requests(self) -> bool:
        # Queued tier transfers (the last blocks' write-through) need one more step to reach the
        # worker; an overlapped step's text, one more call of step.
        return (self.scheduler.has_unfinished_requests() or self.kv_cache.has_queued_transfers
                or self._unmade_text is not None)

    # --- the step ------------------------------------------------------------------------
    def step(self, deliver: Callable[[list[CompletionDelta]], None] | None = None) -> list[CompletionDelta]:
        """One step: schedule -> execute -> outputs; returns the step's deltas. Given `deliver` (a
        serving loop's), the deltas go there and step returns []; with `scheduler.overlap_outputs`
        the text of a step's tokens (detokenizing, stop strings, the deltas) is then made and
        delivered while the next step runs on the device (engine/overlapped_work.py)."""
        if deliver is not None:
            self._step(deliver, overlap=self.config.scheduler.overlap_outputs)
            return []
        deltas: list[CompletionDelta] = []
        self._step(deltas.extend, overlap=False)
        return deltas

    def _step(self, deliver: Callable[[list[CompletionDelta]], None], overlap: bool) -> None:
        start = time.perf_counter()
        step_input = self.scheduler.schedule()
        earlier, self._unmade_text = self._unmade_text, None  # the last step's text, when overlapped
        if not (step_input.num_scheduled_tokens or step_input.finished_request_ids or step_input.kv_transfers):
            if earlier is not None:
                earlier.finish()
            return
        num_prompt_tokens, num_output_tokens = self._count_scheduled_tokens(step_input)
        scheduled = time.perf_counter()
        step_output = self._execute(step_input, earlier)
        executed = time.perf_counter()
        self.kv_cache.on_step_done(step_input, step_output.kv_report, executed - scheduled,
                                   synced=bool(step_output.sampled))
        text = self._take_tokens(step_input, step_output, deliver)
        if overlap and text is not None:
            self._unmade_text = text
        elif text is not None:
            text.finish()
        if num_prompt_tokens or num_output_tokens:  # a step of tier transfers alone is no step
            # Overlapped, "outputs" holds the checks alone: the text runs inside the next "execute".
            phases = {"schedule": scheduled - start, "execute": executed - scheduled,
                      "outputs": time.perf_counter() - executed}  # fmt: skip
            self.step_metrics.observe_step(num_prompt_tokens, num_output_tokens, phases)

    def _execute(self, step_input: StepInput, earlier: OverlappedWork | None) -> StepOutput:
        """The step; the last step's text (when overlapped) is made while the device computes."""
        if earlier is None:
            return self.executor.execute(step_input)
        step_output = self.executor.execute_overlapping(step_input, earlier)
        earlier.finish()
        return step_output

    def _count_scheduled_tokens(self, step_input) -> tuple[int, int]:
        """(prompt tokens, output tokens) this step computes: a request's chunk starts at its
        num_computed_tokens (advanced after the step), and the part past its prompt is output (a
        decoding request's one token, or a preempted request's recomputed outputs)."""
        num_prompt_tokens = num_output_tokens = 0
        for request_id, count in step_input.num_scheduled_tokens.items():
            request = self.scheduler.requests[request_id]
            prompt_part = max(0, min(count, request.num_prompt_tokens - request.num_computed_tokens))
            num_prompt_tokens += prompt_part
            num_output_tokens += count - prompt_part
        return num_prompt_tokens, num_output_tokens

    def _take_tokens(self, step_input, step_output, deliver) -> OverlappedWork | None:
        """The scheduler takes the step's tokens and the checks that need no text end sequences
        now; failures and first tokens are delivered now, and the work that makes the other
        tokens' deltas and delivers them is returned (None when there are none: an idle engine
        must not wait for one more step)."""
        sampled = self.scheduler.update_from_output(step_input, step_output)
        self.prefill_progress.observe(self.scheduler.running)
        for request_id, chunk in step_output.prompt_logprobs.items():
            if request_id in self._sequences and request_id not in step_output.failed:
                self._sequences[request_id].absorb_prompt_logprobs(chunk)
        failed = [self._fail(rid, why) for rid, why in step_output.failed.items() if rid in self._sequences]
        checked = [self._checked(self._sequences[rid], token) for rid, token in sampled.items()]
        first = [item for item in checked if item.is_first]
        if failed or first:  # a first token is not held for a step: TTFT
            deliver(failed + self._texts(first))
        later = [item for item in checked if not item.is_first]
        return OverlappedWork(lambda: deliver(self._texts(later))) if later else None

    def _checked(self, sequence: _Sequence, token: SampledToken) -> _SampledText:
        """A stop token or the length ends the sequence in the scheduler now, before the next
        step is scheduled (its blocks freed); its bookkeeping and last delta wait for its text."""
        request = sequence.request
        num_kv_blocks = self._num_kv_blocks(request.request_id)
        is_first = sequence.first_token_time is None
        if is_first:
            sequence.first_token_time = time.monotonic()
        if request.sampling_params.max_tokens == 0:  # the prompt scored: no output
            status = RequestStatus.FINISHED_LENGTH
        else:
            status = sequence.output.finish_status(request, token.token_id)
        if status is not None:
            self.scheduler.finish_request(request.request_id, status)
        return _SampledText(sequence, token, status, num_kv_blocks, is_first)

    def _texts(self, checked: list[_SampledText]) -> list[CompletionDelta]:
        """The deltas of the sequences not ended since their token was checked (an abort, a
        failure): an overlapped step's text is made while the next step runs."""
        return [self._contained(item) for item in checked
                if self._sequences.get(item.sequence.request.request_id) is item.sequence]

    def _contained(self, item: _SampledText) -> CompletionDelta:
        """The token's delta; a failure here (detokenizing, stop checks) ends this sequence alone."""
        try:
            return self._text_delta(item)
        except Exception as error:  # noqa: BLE001 - one request's failure, reported to its caller
            logger.exception("request %s failed after its token", item.sequence.request.request_id)
            return self._fail(item.sequence.request.request_id, f"its output could not be processed: {error!r}")

    def _fail(self, request_id: str, why: str) -> CompletionDelta:
        logger.error("request %s failed: %s", request_id, why)
        sequence = self._sequences[request_id]
        delta = self._finish(sequence, RequestStatus.FINISHED_FAILED, "", ())
        return dataclasses.replace(delta, error=f"the request failed in the engine: {why}")

    def _text_delta(self, item: _SampledText) -> CompletionDelta:
        """A stop string found here ends a sequence that the checks let go on: overlapped, the
        next step computes one more token for it, which is dropped."""
        sequence, token, num_kv_blocks = item.sequence, item.token, item.num_kv_blocks
        if sequence.request.sampling_params.max_tokens == 0:
            return self._finish(sequence, RequestStatus.FINISHED_LENGTH, "", (), num_kv_blocks=num_kv_blocks)
        result = sequence.output.text(token.token_id, item.finish_status)
        logprobs = (token,) if sequence.request.sampling_params.logprobs is not None else ()
        if result.finish_status is None:
            return self._delta(sequence, result.text, (token.token_id,), logprobs, num_kv_blocks=num_kv_blocks)
        return self._finish(sequence, result.finish_status, result.text, (token.token_id,), logprobs, num_kv_blocks)

    def _finish(self, sequence, status: RequestStatus, text: str, token_ids, logprobs=(),
                num_kv_blocks: int | None = None) -> CompletionDelta:  # fmt: skip
        request = sequence.request
        if num_kv_blocks is None:
            num_kv_blocks = self._num_kv_blocks(request.request_id)
        if not request.status.finished:  # the checks may have ended it in the scheduler already
            self.scheduler.finish_request(request.request_id, status)
        self._sequences.pop(request.request_id, None)
        group = self._request_groups.get(sequence.user_request_id, [])
        if request.request_id in group:
            group.remove(request.request_id)
        if not group:
            self._request_groups.pop(sequence.user_request_id, None)
        return self._delta(sequence, text, token_ids, logprobs, status.value, num_kv_blocks)

    def _delta(self, sequence, text, token_ids, logprobs, finish_reason=None, num_kv_blocks=None) -> CompletionDelta:
        request = sequence.request
        if num_kv_blocks is None:
            num_kv_blocks = self._num_kv_blocks(request.request_id)
        return CompletionDelta(
            request_id=sequence.user_request_id,
            index=sequence.index,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_prefix_hit_tokens=request.num_prefix_hit_tokens,
            num_kv_blocks=num_kv_blocks,
            num_host_hit_tokens=request.num_host_hit_tokens,
            num_redis_hit_tokens=request.num_redis_hit_tokens,
            prompt_logprobs=self._take_prompt_logprobs(sequence),
        )

    @staticmethod
    def _take_prompt_logprobs(sequence: _Sequence) -> tuple[SampledToken, ...] | None:
        """All of them, on the sequence's first delta (its prompt is computed by then)."""
        if sequence.request.sampling_params.prompt_logprobs is None or sequence.prompt_logprobs is None:
            return None
        taken, sequence.prompt_logprobs = tuple(sequence.prompt_logprobs), None
        return taken

    def _num_kv_blocks(self, request_id: str) -> int:
        request = self.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            return 0  # waiting requests hold no blocks
        return len(self.kv_cache.block_table(request_id))

    # --- observability -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        running = self.scheduler.running
        backlog = measure_backlog(self.scheduler.waiting, running, self.kv_cache.tiers.cost)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            num_queued_tokens=self.scheduler.num_queued_tokens,
            num_running_kv_tokens=sum(r.num_computed_tokens for r in running),
            num_free_kv_blocks=self.kv_cache.num_free_blocks,
            num_total_kv_blocks=self.kv_cache.num_blocks,
            block_size=self.block_size,
            kv_redis_up=self.kv_cache.redis_up,
            num_pending_prefill_tokens=backlog.num_tokens,
            pending_prefill_s=backlog.seconds,
            num_decoding=backlog.num_decoding,
            longest_request_tokens=backlog.longest_request_tokens,
        )

    def summary(self) -> EngineSummary:
        description, parallel = self.executor.description, self.config.parallel
        return EngineSummary(
            model_path=self.config.model.path, dtype=description.dtype, device=description.device,
            tensor_parallel_size=parallel.tensor_parallel_size, sequence_parallel_size=parallel.sequence_parallel_size,
            executor=executor_backend(self.config), block_size=self.block_size,
            device_kv_tokens=self.kv_cache.num_blocks * self.block_size, host_kv_tokens=self.kv_cache.host_tier_tokens,
            redis_shards=redis_shard_names(self.config.kv_tiers.redis_urls) if self.kv_cache.redis_up is not None else (),
            redis_up=self.kv_cache.redis_up, load_seconds=self.load_seconds,
        )  # fmt: skip

    def warm_up_stepping_thread(self) -> None:
        """Called by the thread that will step this engine, before its first request (a serving
        loop's thread: engine/engine_loop.py); what a worker prepares per thread is not then
        paid inside that request's step."""
        self.executor.warm_up_stepping_thread()

    def shutdown(self) -> None:
        self.executor.shutdown()
