"""Redis -> host prefetch for a request at the head of the queue: probe first, then fetch.

When a request's prompt runs past what the device and host hold, its remaining blocks are first
*probed* (one pipelined EXISTS on the worker: no host memory is taken, so a cold document evicts
nothing from the host tier), then the blocks that continue its cached run are fetched into host
slots. The request waits at the head of the queue until they have landed or its deadline has
passed; then the scheduler restores from host whatever arrived and recomputes the rest.

    probe out --answer--> fetches out --all landed--> done
        \\___________________ deadline __________________/--> done (a timeout, counted)

Overlap: when the cost model says so (kvcache/tiers/cost_model.py), the first `head_blocks` of
the run are not fetched but recomputed meanwhile. The request is admitted at the probe's answer
with a pause point at the end of its head; at the pause it goes back to the head of the queue
(its head blocks stay in the device prefix cache), waits for the rest as above and restores it:

  | device hits | host run | head: computed meanwhile | rest: fetched meanwhile | computed |

A hybrid model's run also needs the window parts of its last blocks (kvcache/tiers/window_parts.py),
kept for some blocks only: the probe asks for the window parts too, the run is cut back to end
where they exist, and they are fetched with it (the request waits for them too; one that does
not arrive cuts the restore back further: TierManager.plan_restore).

A slot being fetched is referenced in the host pool until its outcome comes back, whether or not
a request still waits for it, so a late fetch can never write into a reused slot; a block that
landed stays referenced by each request waiting for it until that request is admitted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcache.tier_observer import TierObserver
from kvcache.tiers.cost_model import Decision, RestoreCostModel
from kvcache.tiers.host_index import REDIS, HostIndex
from kvcache.tiers.window_parts import WindowParts, window_part_key
from protocol.kv_transfer_ops import HIT, OpsBuilder

logger = logging.getLogger(__name__)


@dataclass
class _Prefetch:
    hashes: tuple[bytes, ...]  # the request's blocks after its host run, in order
    first_block: int  # index of hashes[0] in the request's prompt
    deadline: float
    probe_id: int | None  # set while the probe is out
    waiting: set[int] = field(default_factory=set)  # slots in flight that the request needs
    pinned: list[int] = field(default_factory=list)  # host slots of its run, held while it waits
    started: float = 0.0  # when the probe went out
    num_fetching: int = 0  # blocks it asked for (0 again once their restore time is recorded)
    head_blocks: int = 0  # recomputed while the rest is fetched: the request pauses after them

    @property
    def pause_block(self) -> int:
        return self.first_block + self.head_blocks


class RedisPrefetcher:
    def __init__(self, host: HostIndex, ops: OpsBuilder, metrics: TierObserver, cost: RestoreCostModel, *,
                 decide: Callable[..., Decision], timeout_s: float, clock: Callable[[], float],
                 windows: WindowParts | None = None):
        """`cost`: the estimates (read, and fed each prefetch's whole time); `decide(tier, first
        block, blocks, request id, split=True)`: the decision that is logged and counted;
        `windows`: a hybrid model's window parts."""
        self.host, self.ops, self.metrics, self.cost = host, ops, metrics, cost
        self.windows = windows
        self._decide = decide
        self._timeout_s, self._clock = timeout_s, clock
        self._states: dict[str, _Prefetch] = {}
        self._tried: set[str] = set()  # one prefetch per admission (a preempted request retries)
        self._probes: dict[int, str] = {}  # probe id -> request id
        self._probe_ids = itertools.count()
        self._fetching: dict[int, bytes] = {}  # slot -> hash
        self._fetching_slot: dict[bytes, int] = {}

    @property
    def num_fetching(self) -> int:
        return len(self._fetching) + (self.windows.num_fetching if self.windows else 0)

    @property
    def has_outstanding(self) -> bool:
        """Probes or fetches the worker has not answered yet."""
        return bool(self.num_fetching or self._probes)

    def is_idle(self) -> bool:
        """Nothing in flight and no request state (for leak checks)."""
        return not (self._fetching or self._probes or self._states or self._tried)

    def waiting(self, request_id: str, first_block: int, hashes: Sequence[bytes], redis_up: bool,
                may_start: bool = True) -> bool:
        """Whether the request must wait for Redis now; the first call may start its prefetch.
        `hashes`: its prompt blocks from `first_block` on (the device hits come before).
        With `may_start` False a request that would start one waits instead: a probe answered
        long before admission would be stale by then."""
        state = self._states.get(request_id)
        if state is None and redis_up and request_id not in self._tried:
            first, rest = self._rest(first_block, hashes)
            # Recomputing a block costs more the later it sits (attention), restoring it the same
            # everywhere: if restoring the whole rest loses, so does restoring any prefix of it,
            # and no probe is worth its round trip.
            worth = bool(rest) and self.cost.decide(REDIS, first, len(rest)).restore
            if not may_start:
                return worth
            self._tried.add(request_id)
            if rest and not worth:
                self._decide(REDIS, first, len(rest), request_id)  # recorded: recompute
            state = self._probe(request_id, first, rest) if worth else None
        if state is None:
            return False
        if state.probe_id is None and state.head_blocks and first_block < state.pause_block:
            return False  # admitted now to compute its head; it comes back for the rest
        if (state.probe_id is not None or state.waiting) and self._clock() < state.deadline:
            return True
        self._finish(request_id, timed_out=state.probe_id is not None or bool(state.waiting))
        return False

    def pause_block(self, request_id: str, first_block: int) -> int | None:
        """Where a request admitted from `first_block` stops computing its head, if it has one."""
        state = self._states.get(request_id)
        if state is None or not state.head_blocks or first_block >= state.pause_block:
            return None
        return state.pause_block

    def forget(self, request_id: str) -> None:
        """The request finished, was aborted or preempted: drop its state (not its fetches)."""
        self._finish(request_id, timed_out=False)
        self._tried.discard(request_id)

    def probe_done(self, probe_id: int, present: Sequence[bool]) -> None:
        request_id = self._probes.pop(probe_id, None)
        state = self._states.get(request_id) if request_id is not None else None
        if state is None:  # answered after its request stopped waiting
            return
        state.probe_id = None
        present, window_present = present[:len(state.hashes)], present[len(state.hashes):]
        wanted, state.pinned, in_flight = self._continuation(state.hashes, present)
        end = len(state.hashes)
        if self.windows is not None:
            end = self._window_end(state.hashes, len(wanted) + len(state.pinned) + len(in_flight), window_present)
            before_end = set(state.hashes[:end])
            wanted = [block_hash for block_hash in wanted if block_hash in before_end]
        restore_s = 0.0
        if wanted:
            # A head can be recomputed only when the whole run is to be fetched, from its start.
            decision = self._decide(REDIS, state.first_block, len(wanted), request_id,
                                    split=not state.pinned and not in_flight)
            state.head_blocks, restore_s = decision.head_blocks, decision.restore_s
            wanted = wanted[decision.head_blocks:] if decision.restore else []
        self.host.pin(state.pinned)  # before allocating, which evicts the least recently used
        slots = self.host.allocate(len(wanted)) if wanted else []  # fewer: the leading ones
        for block_hash, slot in zip(wanted, slots):
            self._fetching[slot], self._fetching_slot[block_hash] = block_hash, slot
            self.ops.fetches.append((block_hash, slot))
        state.waiting = set(slots) | in_flight
        if self.windows is not None and (slots or in_flight):
            run = self._run_hashes(state, end)
            state.waiting |= self.windows.fetch(run[-self.windows.window_blocks:], self.ops.fetches)
        state.num_fetching = len(slots)
        # Twice the estimate up to the blocks in host memory (not the step after), plus the slack.
        landed_s = max(restore_s, self.cost.restore_seconds(REDIS, len(slots))) - self.cost.resume_seconds()
        state.deadline = self._clock() + 2 * landed_s + self._timeout_s

    def fetch_done(self, slot: int, outcome: str) -> None:
        block_hash = self._fetching.pop(slot)
        del self._fetching_slot[block_hash]
        landed = outcome == HIT and self.host.fill(slot, block_hash, REDIS, in_redis=True)
        for state in self._states.values():
            if slot in state.waiting and landed:  # held for the request until it is admitted
                self.host.pin((slot,))
                state.pinned.append(slot)
        self.part_done(slot)
        self.host.unpin((slot,))  # the fetch's own reference; a missed slot goes back empty

    def part_done(self, slot: int) -> None:
        """A slot that requests may wait for came back (a block, or a window part)."""
        for state in self._states.values():
            if slot not in state.waiting:
                continue
            state.waiting.discard(slot)
            if not state.waiting and state.num_fetching:
                self.cost.observe_redis_restore(state.num_fetching, self._clock() - state.started,
                                                overlapped=state.head_blocks > 0)
                state.num_fetching = 0

    def _rest(self, first_block: int, hashes: Sequence[bytes]) -> tuple[int, tuple[bytes, ...]]:
        """(first block, hashes) after the host run: what Redis might serve."""
        num_on_host = len(self.host.leading_run(hashes))
        return first_block + num_on_host, tuple(hashes[num_on_host:])

    def _probe(self, request_id: str, first_block: int, rest: tuple[bytes, ...]) -> _Prefetch:
        probe_id = next(self._probe_ids)
        self._probes[probe_id] = request_id
        window_keys = tuple(window_part_key(block_hash) for block_hash in rest) if self.windows is not None else ()
        self.ops.probes.append((probe_id, rest + window_keys))
        now = self._clock()
        self._states[request_id] = state = _Prefetch(rest, first_block, now + self._timeout_s, probe_id, started=now)
        return state

    def _window_end(self, hashes: Sequence[bytes], num_continued: int, window_present: Sequence[bool]) -> int:
        """Where a run of the first `num_continued` of `hashes` can end: the last block whose
        window parts (its own and the window's before it, among these) Redis or host holds."""
        at_hand = [in_redis or self.windows.lookup(block_hash) is not None
                   for block_hash, in_redis in zip(hashes, window_present)]
        for end in range(num_continued, 0, -1):
            if all(at_hand[max(0, end - self.windows.window_blocks):end]):
                return end
        return 0

    def _run_hashes(self, state: _Prefetch, end: int) -> list[bytes]:
        """The blocks it will restore after its head, up to `end`: in host memory or on their way."""
        run = []
        for block_hash in state.hashes[state.head_blocks:end]:
            if self.host.lookup(block_hash) is None and block_hash not in self._fetching_slot:
                break
            run.append(block_hash)
        return run

    def _continuation(self, hashes: Sequence[bytes], present: Sequence[bool]) -> tuple[list, list, set]:
        """The blocks continuing the cached run: (hashes to fetch, host slots, slots in flight)."""
        wanted, held, in_flight = [], [], set()
        for block_hash, in_redis in zip(hashes, present):
            if (slot := self.host.lookup(block_hash)) is not None:
                held.append(slot)
            elif block_hash in self._fetching_slot:
                in_flight.add(self._fetching_slot[block_hash])
            elif in_redis:
                wanted.append(block_hash)
            else:
                break
        return wanted, held, in_flight

    def _finish(self, request_id: str, timed_out: bool) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        if state.probe_id is not None:
            del self._probes[state.probe_id]
        self.host.unpin(state.pinned)
        if timed_out:
            self.metrics.record_prefetch_timeout()
            logger.warning("request %s: %s from Redis not there by its deadline; recomputing the rest",
                           request_id, "the probe" if state.probe_id is not None else f"{len(state.waiting)} blocks")
