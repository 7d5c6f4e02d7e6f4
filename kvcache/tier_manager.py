"""The driver's policy over the KV tiers: spill instead of drop, restore instead of recompute.

Plain Python, no torch, no I/O: it decides which blocks live where and queues the moves; the
worker moves the bytes (model_shards/kv_io/kv_transfer.py) and reports back. Its hooks, in the order
one engine step calls them:

  KVCacheCoordinator.lookup    plan_restore
  KVCacheCoordinator.allocate  device blocks allocated -> commit (or cancel)
  BlockPool.allocate           on_device_evict: an evicted cached block is copied to host
  KVCacheCoordinator.on_tokens_computed -> on_blocks_computed: write-through of newly full blocks
  KVCacheCoordinator.take_transfers     take_ops: this step's KVTransferOps ride on the StepInput
  KVCacheCoordinator.on_step_done       the worker's report, the step time, pins released

The scheduler never calls it directly: kvcache/coordinator.py is its only caller.

A request's restorable prompt blocks at admission (the last prompt token is always computed):

  | device hits | host run: restored | Redis: prefetched to host first | recomputed |
  0             d                    d + h

A Redis prefetch is asynchronous (kvcache/tiers/prefetch.py): the request keeps its place at the
head of the queue (later requests that need nothing from Redis are admitted meanwhile) until its
blocks have reached host memory or its deadline passed, then restores the host run as above. A
fetch that fails verification is a miss: the run ends there and the rest is recomputed. When the
cost model splits the run, the request is admitted at once to compute the run's first blocks
while the rest is fetched, pauses after them (`RestorePlan.pause_block`), and comes back for the
rest.

A hybrid model (`window_blocks` > 0: DeepSeek-V4's compressed entries in group 0 beside a sliding
window group) stores block i as two parts: its group-0 block in a block slot, and its window
block i in a window-part slot of a smaller pool (kvcache/tiers/window_parts.py), each its own
Redis value. A restored prefix of k blocks reads compressed blocks 0 .. k-1 and only the window
parts of its last `window_blocks` blocks, so a run is cut back to end where those are at hand. A
window block is freed as the window moves on, so only a block saved just after it was computed
has its window part: every hybrid block is written through to host when computed (and on to
Redis when configured), its window part too where a restore is likely to end, and nothing is
spilled on eviction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cluster.config import KVTierSettings
from kvcache.block_pool import BlockPool
from kvcache.tier_metrics import TierMetrics
from kvcache.tier_observer import TierObserver
from kvcache.tiers.cost_model import Decision, PrefillFlops, RestoreCostModel
from kvcache.tiers.host_index import HOST, REDIS, HostIndex
from kvcache.tiers.prefetch import RedisPrefetcher
from kvcache.tiers.window_parts import WindowParts, window_part_key
from protocol.host_slots import split_host_bytes
from protocol.kv_transfer_ops import DEVICE_TO_HOST, HOST_TO_DEVICE, KVTransferOps, KVTransferReport, OpsBuilder

logger = logging.getLogger(__name__)

DEVICE = "device"
# How long an idle step may wait in the worker for a fetch to land: short enough to admit the
# waiting request promptly, long enough that the engine does not spin through empty steps.
IDLE_POLL_S = 0.005


class TieredRequest(Protocol):
    request_id: str
    block_hashes: list[bytes]
    num_tokens: int
    num_computed_tokens: int


class StepLike(Protocol):
    @property
    def total_scheduled_tokens(self) -> int: ...

    def scheduled_spans(self) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class RestorePlan:
    """Host slots to load into a request's first new device blocks, in block order."""

    request_id: str
    block_size: int
    first_block: int  # device hits come before the restored blocks
    num_eligible_blocks: int  # full prompt blocks that a cache could serve
    slots: tuple[int, ...] = ()
    origins: tuple[str, ...] = ()  # HOST or REDIS, per slot
    window_slots: tuple[int, ...] = ()  # a hybrid model's window parts of the last blocks (WindowParts.needed)
    # The request computes up to this block, then goes back to the queue to restore what follows
    # (fetched from Redis meanwhile); None: no pause.
    pause_block: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.slots) * self.block_size

    @property
    def host_tokens(self) -> int:
        return self.origins.count(HOST) * self.block_size

    @property
    def redis_tokens(self) -> int:
        return self.origins.count(REDIS) * self.block_size


class TierManager:
    def __init__(self, settings: KVTierSettings, block_size: int, block_nbytes: int,
                 metrics: TierObserver | None = None, clock: Callable[[], float] = time.monotonic,
                 flops: PrefillFlops | None = None, chunk_tokens: int | None = None, window_blocks: int = 0,
                 window_nbytes: int = 0):
        """`flops`: the model's prefill cost (PrefillFlops.of(architecture)); without it the
        recompute estimate is linear in tokens. `chunk_tokens`: the scheduler's step budget.
        `window_blocks`: a hybrid model's window blocks a resume reads (0: one kind of KV), and
        `window_nbytes` the bytes of one's window part (block_nbytes: the rest of a block)."""
        self.settings = settings
        self.window_blocks = window_blocks
        self.window_nbytes = window_nbytes
        self.windows: WindowParts | None = None  # a hybrid model's window parts, with the host tier
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.metrics = metrics if metrics is not None else TierMetrics()
        self.clock = clock
        self.host = self._make_host_index()
        self.redis_enabled = self.host is not None and bool(settings.redis_urls)
        self.redis_up = self.redis_enabled
        self.cost = RestoreCostModel(settings, block_size, max(1, block_nbytes), flops, chunk_tokens,
                                     window_nbytes=window_blocks * window_nbytes)
        self._ops = OpsBuilder()
        self.prefetch = self._make_prefetcher() if self.redis_enabled else None
        self._step_pins: list[int] = []  # host slots used by this step's saves and loads
        self._window_pins: list[int] = []  # the same, of window parts
        self._writing: set[int] = set()  # write-through slots the worker has not read yet
        self._write_through_from: dict[str, int] = {}  # request -> first block not written through
        self._pool: BlockPool | None = None  # the device pool, once track_device gives it
        self._watermark_blocks = 0
        self._next_health_report = clock()  # Redis up or down: reported by the first step

    @classmethod
    def disabled(cls, block_size: int) -> TierManager:
        return cls(KVTierSettings(), block_size, block_nbytes=0)

    def _make_host_index(self) -> HostIndex | None:
        if self.settings.host_bytes == 0:
            return None
        slots = split_host_bytes(self.settings.host_bytes, max(1, self.block_nbytes),
                                 self.window_nbytes if self.window_blocks else 0,
                                 self.settings.window_part_interval_blocks)
        if slots.num_blocks == 0 or (self.window_blocks and not slots.num_window_parts):
            logger.warning("kv_tiers.host_bytes=%d holds no %d-byte block: host and Redis tiers off",
                           self.settings.host_bytes, self.block_nbytes + self.window_nbytes)
            return None
        host = HostIndex(slots.num_blocks, write_back=self._write_back)
        if slots.num_window_parts:
            parts = HostIndex(slots.num_window_parts, write_back=self._write_back, first_slot=slots.num_blocks)
            self.windows = WindowParts(parts, self.window_blocks, self.settings.window_part_interval_blocks,
                                       self.block_size)
        self.metrics.track_tier(HOST, lambda: host.num_cached, self.block_nbytes)
        return host

    def _make_prefetcher(self) -> RedisPrefetcher:
        return RedisPrefetcher(self.host, self._ops, self.metrics, self.cost, decide=self._decide,
                               timeout_s=self.settings.restore_timeout_s, clock=self.clock, windows=self.windows)

    def track_device(self, pool: BlockPool) -> None:
        """The device pool: its size for metrics, its eviction order for spilling ahead."""
        self.metrics.track_tier(DEVICE, lambda: pool.num_cached_blocks, self.block_nbytes)
        self._pool = pool
        self._watermark_blocks = int(self.settings.spill_watermark_fraction * pool.num_blocks)

    @property
    def has_queued_ops(self) -> bool:
        """Transfers decided but not yet sent to the worker, or a Redis health report due."""
        return bool(self._ops) or self._health_report_due()

    @property
    def num_pending(self) -> int:
        """Host slots held by transfers in flight (0 when idle: nothing leaked)."""
        return ((self.prefetch.num_fetching if self.prefetch else 0) + len(self._writing) + len(self._step_pins)
                + len(self._window_pins))

    # --- admission -------------------------------------------------------------------------
    def plan_restore(self, request: TieredRequest, num_device_blocks: int, may_probe: bool = True) -> RestorePlan | None:
        """The host run after the device hits, or None while the request waits for Redis (or,
        with `may_probe` False, would have to start asking it)."""
        eligible = min(len(request.block_hashes), max(0, (request.num_tokens - 1) // self.block_size))
        plan = RestorePlan(request.request_id, self.block_size, num_device_blocks, eligible)
        if self.host is None or num_device_blocks >= eligible:
            return plan
        hashes = request.block_hashes[num_device_blocks:eligible]
        if self.prefetch is not None and self.prefetch.waiting(request.request_id, num_device_blocks, hashes,
                                                               self.redis_up, may_probe):
            return None
        slots = self.host.leading_run(hashes)
        if self.windows is not None:  # a restore ends where its window parts are at hand
            slots = slots[:self.windows.restorable_blocks(request.block_hashes, num_device_blocks, len(slots))]
        if slots and not self._decide(HOST, num_device_blocks, len(slots), request.request_id).restore:
            slots = []
        self.host.pin(slots)  # before the device allocation, whose spills could evict them
        window_slots = ()
        if self.windows is not None and slots:
            window_slots = self.windows.slots(request.block_hashes, num_device_blocks, num_device_blocks + len(slots))
        pause = self.prefetch.pause_block(request.request_id, num_device_blocks + len(slots)) if self.prefetch else None
        return replace(plan, slots=tuple(slots), origins=tuple(self.host.origin(s) for s in slots),
                       window_slots=tuple(window_slots), pause_block=pause)

    def commit(self, plan: RestorePlan, new_block_ids: Sequence[int], window_table: Sequence[int] = ()) -> None:
        """The request got its device blocks: load the plan's slots into the first of them (and a
        hybrid model's window parts of the last ones into its window table's blocks)."""
        self._ops.loads.extend(zip(plan.slots, new_block_ids))
        if plan.window_slots:
            end = plan.first_block + len(plan.slots)
            needed = self.windows.needed(plan.first_block, end)
            self._ops.window_loads.extend((slot, window_table[index]) for index, slot in zip(needed, plan.window_slots))
        self._step_pins.extend(plan.slots)  # the plan's pins now last until the step is done
        self._window_pins.extend(plan.window_slots)
        for slot in plan.slots:
            self.host.mark_restored(slot)
        self._record_lookup(plan)
        # A head computed while the rest is fetched: Redis holds its blocks already.
        self._write_through_from[plan.request_id] = max(plan.first_block + len(plan.slots), plan.pause_block or 0)

    def cancel(self, plan: RestorePlan) -> None:
        """The request was not admitted after all (no device blocks): unpin the plan's slots."""
        if plan.slots:
            self.host.unpin(plan.slots)
        if plan.window_slots:
            self.windows.index.unpin(plan.window_slots)

    def _decide(self, tier: str, first_block: int, num_blocks: int, request_id: str, split: bool = True) -> Decision:
        decision = self.cost.decide(tier, first_block, num_blocks, split)
        self.metrics.record_decision(decision)
        head = f", the first {decision.head_blocks} recomputed meanwhile" if decision.head_blocks else ""
        logger.info("request %s: %s %d blocks (%s: %.2f ms to restore%s, %.2f ms to recompute)", request_id,
                    "restore" if decision.restore else "recompute", num_blocks, tier,
                    decision.restore_s * 1e3, head, decision.recompute_s * 1e3)
        return decision

    def _record_lookup(self, plan: RestorePlan) -> None:
        unserved = (plan.num_eligible_blocks - plan.first_block) * self.block_size
        self.metrics.record_lookup(DEVICE, plan.first_block * self.block_size, unserved)
        if self.host is not None:
            unserved -= plan.host_tokens
            self.metrics.record_lookup(HOST, plan.host_tokens, unserved)
        if self.redis_enabled:
            self.metrics.record_lookup(REDIS, plan.redis_tokens, unserved - plan.redis_tokens)

    # --- spills ------------------------------------------------------------------------------
    def on_device_evict(self, block_id: int, block_hash: bytes) -> None:
        """BlockPool's on_evict: the block's KV is intact until this step's forward pass (a
        hybrid block's window part is long gone: it was written through when computed)."""
        if self.host is not None and not self.window_blocks:
            self._spill(block_id, block_hash, write_through=False)

    def on_blocks_computed(self, request: TieredRequest, block_table: Sequence[int],
                           window_table: Sequence[int] = ()) -> None:
        """Write-through: copy the request's newly full blocks to host and on to Redis (a hybrid
        model's to host always, with their window parts: `window_table`)."""
        start = self._write_through_from.get(request.request_id)
        to_redis = self.redis_enabled and self.settings.redis_write_through and self.redis_up
        if start is None or not (to_redis or (self.window_blocks and self.host is not None)):
            return  # while Redis is down, blocks wait here (and spill to host on eviction)
        end = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for index in range(start, end):
            self._spill(block_table[index], request.block_hashes[index], to_redis)
            window_block = window_table[index] if self.windows is not None else -1
            if window_block >= 0 and self.windows.wanted(index, request.num_tokens):  # (-1: freed, no part)
                key = window_part_key(request.block_hashes[index])
                self._spill(window_block, key, to_redis, self.windows.index, self._ops.window_saves, self._window_pins)
        self._write_through_from[request.request_id] = max(start, end)

    def _spill(self, block_id: int, block_hash: bytes, write_through: bool, host: HostIndex | None = None,
               saves: list | None = None, pins: list | None = None) -> None:
        """Copy a block (or, given the window parts' `host`, `saves` and `pins`, a window part
        under its key) to host unless it is there, and on to Redis with `write_through`."""
        host = host or self.host
        slot = host.lookup(block_hash)
        if slot is not None:
            host.touch(slot)  # host already holds it: keep the copy fresh in the LRU order
        else:
            slot = self._save(block_id, block_hash, host, saves, pins)
            if slot is None:
                return
        if write_through and not host.in_redis(slot) and slot not in self._writing:
            host.pin((slot,))
            self._writing.add(slot)
            self._ops.write_throughs.append((slot, block_hash))

    def _save(self, block_id: int, block_hash: bytes, host: HostIndex | None = None, saves: list | None = None,
              pins: list | None = None) -> int | None:
        host = host or self.host
        slots = host.allocate(1)
        if not slots:  # every slot is held by a transfer in flight
            self.metrics.record_spill_dropped()
            return None
        host.fill(slots[0], block_hash, HOST, in_redis=False)
        (self._ops.saves if saves is None else saves).append((block_id, slots[0]))
        (self._step_pins if pins is None else pins).append(slots[0])
        return slots[0]

    def _spill_ahead(self) -> None:
        """Copy the cached blocks next in eviction order to host before anyone needs their
        memory (the low watermark): evicting them later costs no copy. Free blocks are not
        written by this step's forward pass (its blocks were taken from the queue already)."""
        if self.host is None or self._pool is None or not self._watermark_blocks or self.window_blocks:
            return  # (a hybrid block went to host when it was computed)
        if self._pool.num_unused_blocks >= self._watermark_blocks:
            # The next blocks to evict have never been used: nothing to copy. Without this test
            # every step walked the watermark's ~11K empty blocks of a mostly unused H200 cache
            # (1-2 ms a step on its host, session 14's step anatomy).
            return
        budget = self.settings.spill_ahead_max_blocks_per_step
        for block_id, block_hash in self._pool.next_to_evict(self._watermark_blocks):
            if budget == 0:
                return
            if block_hash is None or self.host.lookup(block_hash) is not None:
                continue  # empty, or host has it already
            if self._save(block_id, block_hash) is None:
                return
            budget -= 1

    def _write_back(self, slot: int, block_hash: bytes) -> None:
        """HostIndex evicts a block that Redis lacks: send it there before the slot is reused."""
        if self.redis_enabled and self.redis_up:
            self._ops.writebacks.append((slot, block_hash))
        elif self.redis_enabled:
            self.metrics.record_redis_write_dropped()

    # --- step boundary -----------------------------------------------------------------------
    def take_ops(self, dropped_request_ids: Iterable[str], idle: bool) -> KVTransferOps | None:
        """This step's transfers; None when there is nothing to move and nothing in flight."""
        for request_id in dropped_request_ids:
            self._forget(request_id)
        self._spill_ahead()
        in_flight = bool(self._writing) or (self.prefetch is not None and self.prefetch.has_outstanding)
        # While Redis is down the worker is still called each step: that is when it checks
        # whether Redis is back (the driver sends it no Redis work meanwhile).
        redis_down = self.redis_enabled and not self.redis_up
        health_due = self._health_report_due()
        if not self._ops and not in_flight and not redis_down and not health_due:
            return None
        if health_due:
            self._next_health_report = self.clock() + self.settings.redis_health_check_period_s
        return self._ops.take(IDLE_POLL_S if idle and in_flight else 0.0)

    def _health_report_due(self) -> bool:
        """An idle replica still steps this often while Redis is configured: the worker pings
        Redis in the background and the step's report says whether it answers."""
        return self.redis_enabled and self.clock() >= self._next_health_report

    def on_step_done(self, step_input: StepLike, report: KVTransferReport | None, seconds: float,
                     synced: bool = True) -> None:
        """The worker ran the step: apply its report, measure the prefill rate, release pins.
        `synced`: the step waited for the device (it sampled; see `observe_prefill`)."""
        loads_s = saved_bytes = 0.0
        if report is not None:
            self._absorb(report)
            # A restore's loads are the host estimate's, not the prefill's. Saves stay in: those
            # of write-through are what recomputing costs in serving, and a save waits for the
            # chunk before it (session 5's H200: without them, 0.28 s estimated for a 64K
            # recompute that took 0.36 s).
            loads_s = sum(sample.seconds for sample in report.transfers if sample.path == HOST_TO_DEVICE)
            saved_bytes = sum(sample.nbytes for sample in report.transfers if sample.path == DEVICE_TO_HOST)
        if self._step_pins:
            self.host.unpin(self._step_pins)
            self._step_pins = []
        if self._window_pins:
            self.windows.index.unpin(self._window_pins)
            self._window_pins = []
        spans = step_input.scheduled_spans()
        if self.host is not None and self._measures_prefill(spans):
            self.cost.observe_prefill(spans, seconds - loads_s, synced, saved_bytes)
            self.metrics.record_estimates(self.cost)
        else:
            self.cost.discard_unsynced_prefill()

    def _measures_prefill(self, spans: list[tuple[int, int]]) -> bool:
        """A step of prefill chunks, at least a block of them: decodes read their whole KV for
        one token each, a cost in memory bandwidth that FLOPs do not describe."""
        chunks = [count for _, count in spans if count > 1]
        num_decodes = len(spans) - len(chunks)
        return sum(chunks) >= self.block_size and num_decodes <= sum(chunks) // 8

    def _forget(self, request_id: str) -> None:
        if self.prefetch is not None:
            self.prefetch.forget(request_id)
        self._write_through_from.pop(request_id, None)

    def _absorb(self, report: KVTransferReport) -> None:
        self.metrics.record_report(report)
        for sample in report.transfers:
            self.cost.observe_transfer(sample.path, sample.nbytes, sample.seconds)
        for probe_id, present in report.probed:
            self.prefetch.probe_done(probe_id, present)
        for slot, outcome in report.fetched:
            if self.windows is not None and self.windows.index.owns(slot):
                self.windows.fetch_done(slot, outcome)
                self.prefetch.part_done(slot)
            else:
                self.prefetch.fetch_done(slot, outcome)
        for slot, stored in report.written:
            self._writing.discard(slot)
            host = self.windows.index if self.windows is not None and self.windows.index.owns(slot) else self.host
            if stored:
                host.set_in_redis(slot)
            host.unpin((slot,))
        if self.redis_enabled and report.redis_up != self.redis_up:
            self.redis_up = report.redis_up
            logger.warning("Redis tier %s", "is back" if report.redis_up else "is down: recomputing instead")
