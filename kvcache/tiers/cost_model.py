"""Restore or recompute: the estimated time to first token of each, on this machine.

Three estimates, each a `LinearEstimate` (kvcache/tiers/linear_estimate.py): calibrated at start-up
by a short probe on the actual device and Redis (engine/calibration.py), then corrected by every
measurement while serving, so that an estimate off by 2x is right after one measurement.

  prefill      one engine step: (1, weight FLOPs, attention FLOPs, chunks with context, bytes
               saved to host) -> seconds. Every step that computed a prefill chunk is a
               measurement (minus a restore's loads), with the steps before it that sampled
               nothing (they return before their kernels ran). With write-through, each chunk's
               blocks are saved at the start of the next step, which waits for the chunk: a
               recompute pays the saves of all its chunks but the last, a restore's resume
               step none (session 5's H200: without them a 64K recompute was priced 0.28 s, 0.36 s
               measured).
  host load    host -> device copy of a step's loads: (1, bytes) -> seconds.
  redis fetch  a whole prefetch as the driver sees it, probe out to the last block in host
               memory: (1, bytes) -> seconds. Its fixed part holds the round trips and the engine
               steps between them (~0.1 s on the H200 host, as much as moving 16K tokens).
  overlap      how much slower a fetch runs while the request's head is computed than alone:
               (alone estimate) -> seconds, a factor. Split restores correct it, not the fetch
               estimate: on the H200 a 5.4 GB fetch beside a 389K-token head ran at 1.15 GB/s
               where a whole restore ran at 1.9 GB/s, and one estimate for both had the split
               planned at the alone rate and every later whole restore priced at the shared one.

Recompute is not linear in tokens: a token at position p attends to p + 1 keys, so the last block
of a 1M-token prefix costs ~40x the first (an 8B model), and at 1M tokens attention is most of
the prefill. A rate in tokens/s measured on short prompts would put a 1M-token recompute at a
fraction of its real time and refuse restores that win by minutes. So a step's cost is split into
weight FLOPs and causal-attention FLOPs (`PrefillFlops`, from the architecture), each with its own
coefficient (attention kernels and matmuls run at different fractions of peak), plus a fixed cost
per step (scheduling, launches, sampling: what dominates a 64-token step) and one per chunk that
has context before it (such a chunk gathers its cached keys and merges partial attentions:
model_shards/attention/chunked_prefill.py; on the H200 the second 8K chunk of a probe cost 2x the
first, which the FLOPs alone put at 1.3x, and a calibration without this term had to put that on
attention and drop the weights' cost to nothing).

Overlap. Restoring blocks from Redis keeps the device idle for that request, and recomputing the
first blocks of a prefix is cheap (they attend to few keys). So a Redis restore may be split: the
first `head_blocks` are recomputed *while* the rest is fetched, and the request then restores that
rest (kvcache/tiers/prefetch.py). Its time is

    max(prefill of the head, overlap x fetch of the rest) + host -> device load of the rest

and the head is chosen to minimize it: where the prefill of the head catches up with the fetch of
the rest. Both paths then compute the same remaining prompt tokens, but a restored request
computes them in a step of their own (after the pause, or after the Redis wait), which
recomputing folds into its last chunk: a Redis restore pays that step's fixed cost
(`resume_seconds`).

A restore is chosen only when its estimate beats recomputing by `restore_margin` (a restore also
costs Redis bandwidth and host memory, and its time varies more than a prefill's); a split only
when it beats restoring the whole run by the same margin (it adds a pause and shares the machine),
and only when the overlap factor is known: configured (`initial_split_fetch_slowdown`) or measured.
A guessed factor cannot be bounded: on the H200 of session 4 a fetch beside a head took 7x its time
alone, more than recomputing the head and then fetching, so a split priced at a guess of 1.5 took
0.23 s where recomputing took 0.07 s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.config import KVTierSettings, SchedulerSettings
from kvcache.tiers.host_index import REDIS
from kvcache.tiers.linear_estimate import LinearEstimate
from protocol.kv_transfer_ops import (
    DEVICE_TO_HOST,
    HOST_TO_DEVICE,
    HOST_TO_REDIS,
    REDIS_TO_HOST,
)

if TYPE_CHECKING:  # the control plane reads config.json shapes, never model code
    from model_folder.hf_config import ModelArchitecture

# A smaller transfer mostly measures call overhead, not bandwidth.
_MIN_SAMPLE_BYTES = 64 << 10
# Fixed costs until calibrated or measured: one engine step, one host -> device batch, one Redis
# prefetch (probe and fetch round trips). Guesses; the start-up probe replaces them.
_INITIAL_STEP_S = 2e-3
_INITIAL_LOAD_S = 1e-4
_INITIAL_FETCH_S = 2e-3
_INITIAL_CONTEXT_S = 1e-4  # extra for a chunk with context: gathers and merges
_STEP, _WEIGHTS, _ATTENTION, _CONTEXT, _SAVED = range(5)  # the prefill estimate's amounts
# A fetch beside a head against alone when not configured: unused, no split is planned then.
_UNKNOWN_SLOWDOWN = 1.5


class Ema:
    """An exponential moving average whose first sample replaces the initial guess (the
    measured bandwidth of each path, exported as a metric)."""

    def __init__(self, initial: float, alpha: float):
        self.value = initial
        self.alpha = alpha
        self.measured = False

    def update(self, sample: float) -> None:
        self.value = self.value + self.alpha * (sample - self.value) if self.measured else sample
        self.measured = True


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of computing positions [start, end) of one sequence, whose keys start at 0."""

    per_token: float  # 2 x the weights one token passes through (projections and MLP)
    per_key: float  # QK^T and PV for one (query, key) pair over every layer and head

    @classmethod
    def of(cls, arch: ModelArchitecture) -> PrefillFlops:
        if getattr(arch, "architecture", None) == "deepseek_v4":  # (tests pass plain namespaces of shapes)
            return cls._of_deepseek_v4(arch)
        attention_weights = arch.hidden_size * arch.head_dim * (2 * arch.num_attention_heads
                                                                 + 2 * arch.num_key_value_heads)
        mlp_weights = 3 * arch.hidden_size * arch.intermediate_size
        return cls(per_token=2.0 * arch.num_hidden_layers * (attention_weights + mlp_weights),
                   per_key=4.0 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim)

    @classmethod
    def _of_deepseek_v4(cls, arch) -> PrefillFlops:
        """Active weights per token (projections, top-k experts and the one shared expert) plus the attention a
        query always pays (its window, CSA's top-k entries); only HCA's entries grow with the
        context, one per m' keys."""
        heads, head_dim, hidden = arch.num_attention_heads, arch.head_dim, arch.hidden_size
        attention_weights = (hidden * arch.q_lora_rank + arch.q_lora_rank * heads * head_dim + hidden * head_dim
                             + heads * head_dim * arch.o_lora_rank // arch.o_groups + arch.o_lora_rank * hidden)
        expert_weights = (arch.num_experts_per_tok + 1) * 3 * hidden * arch.moe_intermediate_size
        per_pair = 4.0 * heads * head_dim  # QK^T and PV of one (query, key) pair in one layer
        fixed_keys = sum(arch.sliding_window + (arch.index_topk if t == "compressed_sparse_attention" else 0)
                         for t in arch.layer_types)
        growing = sum(1 / arch.compress_rate(t) for t in arch.layer_types if t == "heavily_compressed_attention")
        return cls(per_token=2.0 * arch.num_hidden_layers * (attention_weights + expert_weights) + per_pair * fixed_keys,
                   per_key=per_pair * growing)

    @classmethod
    def tokens_only(cls) -> PrefillFlops:
        """One "FLOP" per token: a rate in tokens/s, for callers without an architecture."""
        return cls(per_token=1.0, per_key=0.0)

    def amounts(self, start: int, end: int) -> tuple[float, float]:
        """(weight FLOPs, attention FLOPs) of positions [start, end)."""
        keys = (end * (end + 1) - start * (start + 1)) // 2  # position p attends to p + 1 keys
        return self.per_token * (end - start), self.per_key * keys

    def span(self, start: int, end: int) -> float:
        return sum(self.amounts(start, end))

    def of_step(self, spans: Iterable[tuple[int, int]]) -> tuple[float, float, int]:
        """(weight FLOPs, attention FLOPs, chunks with context) of one step's chunks, (first
        position, tokens) each."""
        weights = attention = 0.0
        with_context = 0
        for start, count in spans:
            w, a = self.amounts(start, start + count)
            weights, attention, with_context = weights + w, attention + a, with_context + (start > 0)
        return weights, attention, with_context

    def of_steps(self, steps: Iterable[Iterable[tuple[int, int]]]) -> tuple[float, float, float, int]:
        """(steps, weight FLOPs, attention FLOPs, chunks with context) of several steps: the
        prefill estimate's amounts, which add up over steps."""
        totals = [0.0, 0.0, 0.0, 0]
        for spans in steps:
            totals = [total + amount for total, amount in zip(totals, (1.0, *self.of_step(spans)))]
        return tuple(totals)


@dataclass(frozen=True)
class Decision:
    tier: str
    num_blocks: int  # blocks the tier holds, from the first block on
    restore: bool
    restore_s: float  # estimated, with the best split (REDIS)
    recompute_s: float
    head_blocks: int = 0  # of them, recomputed while the rest is fetched (REDIS, when restoring)


class RestoreCostModel:
    def __init__(self, settings: KVTierSettings, block_size: int, block_nbytes: int,
                 flops: PrefillFlops | None = None, chunk_tokens: int | None = None, window_nbytes: int = 0):
        """`chunk_tokens`: the scheduler's token budget per step (a prefill's chunk size);
        `window_nbytes`: a hybrid model's window parts that a restore reads once, at its end."""
        self.policy = settings.restore_policy
        self.margin = settings.restore_margin
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.window_nbytes = window_nbytes
        self.chunk_tokens = chunk_tokens or SchedulerSettings().max_tokens_per_step
        self.flops = flops or PrefillFlops.tokens_only()
        alpha = settings.ema_alpha
        seconds_per_flop = 1.0 / (settings.initial_prefill_tokens_per_s * self.flops.per_token)
        seconds_per_saved_byte = 1.0 / settings.initial_host_bandwidth_bytes_per_s
        self.prefill = LinearEstimate((_INITIAL_STEP_S, seconds_per_flop, seconds_per_flop, _INITIAL_CONTEXT_S,
                                       seconds_per_saved_byte), alpha)
        # Each computed chunk is saved to host in the next step (write-through to Redis).
        self.saves_chunks = settings.redis_write_through and bool(settings.redis_urls)
        self.host_load = LinearEstimate((_INITIAL_LOAD_S, 1.0 / settings.initial_host_bandwidth_bytes_per_s), alpha)
        self.redis_fetch = LinearEstimate((_INITIAL_FETCH_S, 1.0 / settings.initial_redis_bandwidth_bytes_per_s),
                                          alpha)
        slowdown = settings.initial_split_fetch_slowdown
        self.overlap = LinearEstimate((slowdown or _UNKNOWN_SLOWDOWN,), alpha)  # beside a head / alone
        self.overlap_configured = slowdown is not None
        # Steps that sampled nothing, whose GPU work is still queued when they return: their
        # amounts and seconds, added to the next step that waits for the device (it samples).
        self._unsynced: tuple[tuple[float, ...], float] | None = None
        # What each path measured (metrics only: the estimates above decide).
        self.bandwidth = {path: Ema(0.0, alpha) for path in (DEVICE_TO_HOST, HOST_TO_DEVICE, HOST_TO_REDIS,
                                                             REDIS_TO_HOST)}

    # --- measurements ----------------------------------------------------------------------------
    def observe_prefill(self, spans: Iterable[tuple[int, int]], seconds: float, synced: bool = True,
                        saved_bytes: float = 0.0) -> None:
        """One step's chunks, (first position, tokens) each, and the seconds it took. `synced`: the
        step waited for the device (it sampled a token). One that did not returns once its kernels
        are queued (on the H200 an 8K chunk in 4.8 ms of 20), and the next synced step waits for
        them too (the last chunk of a 24K probe took 108 ms): the steps up to a synced one are one
        measurement, their amounts and seconds added. `saved_bytes`: device -> host copies the
        step made first (write-through saves, spills)."""
        amounts = (1.0, *self.flops.of_step(spans), saved_bytes)
        if self._unsynced is not None:
            earlier, earlier_s = self._unsynced
            amounts, seconds = tuple(a + b for a, b in zip(earlier, amounts)), earlier_s + seconds
        self._unsynced = None if synced else (amounts, seconds)
        if synced:
            self.prefill.observe(amounts, seconds)

    def discard_unsynced_prefill(self) -> None:
        """A step that measured no prefill ran: unsynced steps before it cannot be told apart
        from it (their device work finished during it)."""
        self._unsynced = None

    def observe_transfer(self, path: str, nbytes: int, seconds: float) -> None:
        """One batch the worker timed; host -> device batches correct the load estimate."""
        if nbytes < _MIN_SAMPLE_BYTES or seconds <= 0:
            return
        self.bandwidth[path].update(nbytes / seconds)
        if path == HOST_TO_DEVICE:
            self.host_load.observe((1.0, nbytes), seconds)

    def observe_redis_restore(self, num_blocks: int, seconds: float, overlapped: bool = False) -> None:
        """A whole prefetch, probe to the last block in host memory. `overlapped`: fetched while
        the request's head was computed, which corrects the overlap factor, not the fetch."""
        if overlapped:
            self.overlap.observe((self.fetch_seconds(num_blocks),), seconds)
        else:
            self.redis_fetch.observe((1.0, self.restore_nbytes(num_blocks)), seconds)

    def calibrate(self, prefills: Sequence[tuple[Sequence[Sequence[tuple[int, int]]], float]],
                  loads: Sequence[tuple[int, float]], fetches: Sequence[tuple[int, float]],
                  round_trips_s: float = 0.0, saves_chunks: bool = False) -> None:
        """The start-up probe's measurements become the priors: prefills (the spans of each of
        its steps, seconds up to the device's last result), host -> device loads and Redis fetches
        (bytes, seconds, timed on the worker). Each estimate is fitted to its own, and the fit
        becomes its prior: the first real measurement still corrects it. `round_trips_s`: a
        prefetch of nothing as the driver sees it (a probe, then a fetch, each sent in one
        engine step and answered in a later one), which the worker's timings do not hold (on
        the H200 they put a prefetch's fixed cost at 2.5 ms, serving measured 18 ms).
        `saves_chunks`: each prefill step after the first saved the chunk before it to host."""
        samples = []
        for steps, seconds in prefills:
            saved_tokens = sum(count for spans in steps[:-1] for _, count in spans) if saves_chunks else 0
            samples.append(((*self.flops.of_steps(steps), self._saved_bytes(saved_tokens)), seconds))
        self.prefill.calibrate(samples)
        self.host_load.calibrate([((1.0, nbytes), seconds) for nbytes, seconds in loads])
        self.redis_fetch.calibrate([((1.0, nbytes), seconds + round_trips_s) for nbytes, seconds in fetches])

    # --- estimates -------------------------------------------------------------------------------
    def prefill_seconds(self, start: int, end: int) -> float:
        """Computing positions [start, end) of one prompt, in chunks of the step budget."""
        if end <= start:
            return 0.0
        num_steps = -(-(end - start) // self.chunk_tokens)
        with_context = num_steps - (start == 0)
        saved_tokens = (num_steps - 1) * self.chunk_tokens if self.saves_chunks else 0  # all chunks but the last
        return self.prefill.predict((num_steps, *self.flops.amounts(start, end), with_context,
                                     self._saved_bytes(saved_tokens)))

    def _saved_bytes(self, tokens: int) -> float:
        return float(tokens // self.block_size * self.block_nbytes)

    def resume_seconds(self) -> float:
        """The fixed cost of the step a restored request computes its remaining tokens in (it
        saves nothing first: its blocks came from host)."""
        coefficients = self.prefill.coefficients
        return coefficients[_STEP] + coefficients[_CONTEXT]

    def recompute_seconds(self, first_block: int, num_blocks: int) -> float:
        start = first_block * self.block_size
        return self.prefill_seconds(start, start + num_blocks * self.block_size)

    def restore_nbytes(self, num_blocks: int) -> int:
        """Bytes a restore of `num_blocks` blocks moves: each block, plus a hybrid model's window
        parts of the last ones (DeepSeek-V4: compressed parts x blocks + one window part)."""
        return num_blocks * self.block_nbytes + self.window_nbytes if num_blocks else 0

    def load_seconds(self, num_blocks: int) -> float:
        return self.host_load.predict((1.0, self.restore_nbytes(num_blocks))) if num_blocks else 0.0

    def fetch_seconds(self, num_blocks: int) -> float:
        return self.redis_fetch.predict((1.0, self.restore_nbytes(num_blocks))) if num_blocks else 0.0

    def restore_seconds(self, tier: str, num_blocks: int) -> float:
        """Restoring all blocks, none recomputed. From Redis, up to the step after the load (from
        host memory the load joins the step that computes the rest anyway)."""
        if tier != REDIS:
            return self.load_seconds(num_blocks)
        return self.fetch_seconds(num_blocks) + self.load_seconds(num_blocks) + self.resume_seconds()

    def overlapped_fetch_seconds(self, num_blocks: int) -> float:
        """Fetching while a head is computed."""
        return self.overlap.predict((self.fetch_seconds(num_blocks),))

    def overlap_known(self) -> bool:
        """Configured for this host, or measured by a split restore (an outlier held back does not
        count): a split's price is only as good as this factor."""
        return self.overlap_configured or self.overlap.num_observations > 0

    def split_seconds(self, first_block: int, num_blocks: int, head_blocks: int) -> float:
        """Recompute the first `head_blocks` while the rest comes from Redis, then load the rest;
        no head: the whole run restored."""
        if head_blocks == 0:
            return self.restore_seconds(REDIS, num_blocks)
        rest = num_blocks - head_blocks
        return (max(self.recompute_seconds(first_block, head_blocks), self.overlapped_fetch_seconds(rest))
                + self.load_seconds(rest) + self.resume_seconds())

    def best_head(self, first_block: int, num_blocks: int) -> int:
        """The head that minimizes `split_seconds` among heads of at least one block: near where
        the head's prefill catches up with the fetch of the rest (the one grows with the head,
        the other shrinks). 0 when the run is too short to split."""
        if num_blocks < 2:
            return 0
        low, high = 1, num_blocks - 1  # the first head whose prefill is no faster than the fetch
        while low < high:
            middle = (low + high) // 2
            if self.recompute_seconds(first_block, middle) >= self.overlapped_fetch_seconds(num_blocks - middle):
                high = middle
            else:
                low = middle + 1
        candidates = {max(1, low - 1), low}
        return min(sorted(candidates), key=lambda head: self.split_seconds(first_block, num_blocks, head))

    # --- the decision ------------------------------------------------------------------------------
    def decide(self, tier: str, first_block: int, num_blocks: int, split: bool = True) -> Decision:
        """Restore blocks [first_block, first_block + num_blocks) of a prompt from `tier`?
        `split`: a Redis restore may recompute a head while the rest is fetched."""
        recompute_s = self.recompute_seconds(first_block, num_blocks)
        restore_s = self.restore_seconds(tier, num_blocks) if num_blocks else 0.0
        head = 0
        if tier == REDIS and split and self.policy == "cost" and self.overlap_known():
            head = self.best_head(first_block, num_blocks)
            split_s = self.split_seconds(first_block, num_blocks, head) if head else restore_s
            # A split pauses the request and shares the machine with its fetch: it must win clearly.
            head, restore_s = (head, split_s) if split_s * (1.0 + self.margin) < restore_s else (0, restore_s)
        if self.policy == "cost":
            restore = num_blocks > 0 and restore_s * (1.0 + self.margin) < recompute_s
        else:
            restore = self.policy == "always"
        return Decision(tier, num_blocks, restore, restore_s, recompute_s, head if restore else 0)

    # --- reporting -----------------------------------------------------------------------------
    def restore_threshold_tokens(self, limit_tokens: int = 1 << 24) -> int | None:
        """The shortest prefix that a Redis restore (from position 0) beats recomputing; None
        below `limit_tokens`. Doubling, then bisection: longer prefixes favour restoring."""
        limit = limit_tokens // self.block_size
        high = 1
        while high <= limit and not self.decide(REDIS, 0, high).restore:
            high *= 2
        if high > limit:
            return None
        low = high // 2  # loses (or is 0)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self.decide(REDIS, 0, middle).restore else (middle, high)
        return high * self.block_size

    def describe(self) -> str:
        """The estimates in words, for the log."""
        step_s, per_weight_flop, per_attention_flop, context_s, per_saved_byte = self.prefill.coefficients
        fetch_s, per_fetch_byte = self.redis_fetch.coefficients
        load_s, per_load_byte = self.host_load.coefficients
        threshold = self.restore_threshold_tokens()
        overlap = f"x{self.overlap.coefficients[0]:.3g}" if self.overlap_known() else "no split (unknown slowdown)"
        return (f"prefill {step_s * 1e3:.3g} ms a step (+{context_s * 1e3:.3g} ms with context) + weights at "
                f"{1 / per_weight_flop:.3g} FLOP/s + attention at {1 / per_attention_flop:.3g} FLOP/s + saves at "
                f"{1e-9 / per_saved_byte:.3g} GB/s; Redis prefetch "
                f"{fetch_s * 1e3:.3g} ms + {1e-9 / per_fetch_byte:.3g} GB/s, {overlap} beside a head; "
                f"host load {load_s * 1e3:.3g} ms + {1e-9 / per_load_byte:.3g} GB/s; "
                f"a Redis restore wins from {threshold or 'no'} tokens")
