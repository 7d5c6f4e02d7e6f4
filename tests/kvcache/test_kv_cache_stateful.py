"""Random scheduler traffic against KVCacheManager, checked against a shadow model of the KV.

A small scheduler drives requests built from a few shared documents (so prefixes hit), through
chunked prefill, decode, preemption, abort and finish, in a pool small enough that allocation
fails and cached blocks get evicted. After every step the pool's books must balance, and every
computed block of every request must hold exactly that request's tokens: the shadow records
which prefix (block hash) was last written into each block id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvcache.block_hash import hash_full_blocks, root_hash
from kvcache.kv_cache_manager import KVCacheManager

NUM_BLOCKS = 40
BLOCK_SIZE = 4
ROOT = root_hash("stateful-test-model")
DOCUMENTS = [[1000 * doc + i for i in range(40)] for doc in range(3)]
SMALL_TOKENS = st.integers(0, 3)  # few distinct tokens, so separate requests compute equal blocks
MAX_EXAMPLES, STEPS_PER_EXAMPLE = 100, 120

stats: Counter[str] = Counter()


@dataclass
class Request:
    request_id: str
    tokens: list[int]
    num_prompt_tokens: int
    max_output_tokens: int
    num_computed: int = 0
    block_hashes: list[bytes] = field(default_factory=list)

    def rehash(self) -> None:
        self.block_hashes = hash_full_blocks(self.tokens, BLOCK_SIZE, ROOT)


class SchedulerTraffic(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, on_evict=self.check_evicted)
        self.pool = self.manager.pool
        self.running: dict[str, Request] = {}
        self.preempted: dict[str, Request] = {}
        self.written: dict[int, bytes | None] = {}  # block id -> hash of the full block written
        self.num_requests = 0

    # --- scheduler actions -------------------------------------------------------------------

    @rule(
        document=st.integers(0, len(DOCUMENTS) - 1),
        prefix_len=st.integers(0, 40),
        suffix=st.lists(SMALL_TOKENS, max_size=12),
        max_output_tokens=st.integers(1, 12),
        chunk=st.integers(1, 48),
    )
    def admit_new_request(self, document, prefix_len, suffix, max_output_tokens, chunk):
        stats["operations"] += 1
        tokens = DOCUMENTS[document][:prefix_len] + suffix or [7]
        self.num_requests += 1
        request = Request(f"r{self.num_requests}", tokens, len(tokens), max_output_tokens)
        request.rehash()
        self.admit(request, chunk)

    @precondition(lambda self: self.preempted)
    @rule(pick=st.integers(0, 10**6), chunk=st.integers(1, 48))
    def resume_preempted_request(self, pick, chunk):
        stats["operations"] += 1
        request = self.preempted.pop(sorted(self.preempted)[pick % len(self.preempted)])
        self.admit(request, chunk)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10**6), chunk=st.integers(1, 16), sampled=SMALL_TOKENS)
    def step_running_request(self, pick, chunk, sampled):
        stats["operations"] += 1
        request = self.running[sorted(self.running)[pick % len(self.running)]]
        target = min(len(request.tokens), request.num_computed + chunk)
        if self.manager.allocate_slots(request.request_id, target) is None:
            stats["preempted"] += 1
            self.preempt(request)
            return
        self.compute(request, target, sampled)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10**6))
    def abort_running_request(self, pick):
        stats["operations"] += 1
        request_id = sorted(self.running)[pick % len(self.running)]
        del self.running[request_id]
        self.manager.free(request_id)

    @rule()
    def free_unknown_request_is_a_no_op(self):
        stats["operations"] += 1
        before = self.snapshot()
        self.manager.free("never-admitted")
        assert self.snapshot() == before

    # --- the scheduler's helpers ---------------------------------------------------------------

    def admit(self, request: Request, chunk: int) -> None:
        """Admission after arrival or preemption: prefix hits, then the first chunk."""
        hit_blocks, hit_tokens = self.manager.find_cached_prefix(
            request.block_hashes, len(request.tokens)
        )
        assert hit_tokens <= len(request.tokens) - 1
        assert [self.pool.block_hash(b) for b in hit_blocks] == request.block_hashes[: len(hit_blocks)]
        target = min(len(request.tokens), hit_tokens + chunk)
        before = self.snapshot()
        if self.manager.allocate_slots(request.request_id, target, hit_blocks) is None:
            assert self.snapshot() == before, "a failed allocation changed the pool"
            stats["admission_refused"] += 1
            request.num_computed = 0
            self.preempted[request.request_id] = request
            return
        stats["hit_blocks"] += len(hit_blocks)
        request.num_computed = hit_tokens
        self.running[request.request_id] = request
        self.compute(request, target, sampled=0)

    def compute(self, request: Request, target: int, sampled: int) -> None:
        """The model writes KV for tokens [num_computed, target); then the scheduler's bookkeeping."""
        self.write_kv(request, request.num_computed, target)
        request.num_computed = target
        self.manager.cache_full_blocks(request.request_id, request.block_hashes, target)
        stats["steps"] += 1
        if target < len(request.tokens):
            return  # mid prefill: no logits yet
        if len(request.tokens) - request.num_prompt_tokens >= request.max_output_tokens:
            stats["finished"] += 1
            del self.running[request.request_id]
            self.manager.free(request.request_id)
            return
        request.tokens.append(sampled)
        request.rehash()

    def preempt(self, request: Request) -> None:
        del self.running[request.request_id]
        self.manager.free(request.request_id)
        request.num_computed = 0
        self.preempted[request.request_id] = request

    def write_kv(self, request: Request, start: int, end: int) -> None:
        table = self.manager.block_table(request.request_id)
        for index in range(start // BLOCK_SIZE, -(-end // BLOCK_SIZE)):
            block_id = table[index]
            assert self.pool.ref_count(block_id) == 1, f"write into shared block {block_id}"
            assert self.pool.block_hash(block_id) is None, f"write into cached block {block_id}"
            is_full = (index + 1) * BLOCK_SIZE <= end
            self.written[block_id] = request.block_hashes[index] if is_full else None

    def check_evicted(self, block_id: int, block_hash: bytes) -> None:
        assert self.pool.ref_count(block_id) == 1  # just handed to its new owner, not yet written
        assert self.written[block_id] == block_hash, "evicted block does not hold its content"
        stats["evicted"] += 1

    def snapshot(self) -> tuple:
        blocks = range(NUM_BLOCKS)
        return (
            self.pool.free_queue(),
            [self.pool.ref_count(b) for b in blocks],
            [self.pool.block_hash(b) for b in blocks],
            {rid: list(self.manager.block_table(rid)) for rid in self.running},
        )

    # --- what must hold after every step --------------------------------------------------------

    @invariant()
    def no_block_leaks(self):
        referenced = [b for b in range(NUM_BLOCKS) if self.pool.ref_count(b) > 0]
        assert self.pool.num_free_blocks + len(referenced) == NUM_BLOCKS
        assert set(self.pool.free_queue()) == set(range(NUM_BLOCKS)) - set(referenced)

    @invariant()
    def ref_counts_equal_block_table_occurrences(self):
        occurrences = Counter(
            b for rid in self.running for b in self.manager.block_table(rid)
        )
        assert all(self.pool.ref_count(b) == occurrences[b] for b in range(NUM_BLOCKS))
        shared = [b for b, n in occurrences.items() if n > 1]
        assert all(self.pool.block_hash(b) is not None for b in shared), "shared uncached block"

    @invariant()
    def hash_index_matches_block_hashes(self):
        cached = {b: self.pool.block_hash(b) for b in range(NUM_BLOCKS)}
        cached = {b: h for b, h in cached.items() if h is not None}
        assert self.pool.num_cached_blocks == len(cached)
        assert all(self.pool.lookup(h) == b for b, h in cached.items())

    @invariant()
    def every_computed_block_holds_its_request_s_tokens(self):
        for request in self.running.values():
            table = self.manager.block_table(request.request_id)
            assert len(table) * BLOCK_SIZE >= request.num_computed
            num_full = request.num_computed // BLOCK_SIZE
            written = [self.written.get(b) for b in table[:num_full]]
            assert written == request.block_hashes[:num_full]

    def teardown(self):
        for request_id in list(self.running):
            self.manager.free(request_id)
        assert self.pool.num_free_blocks == NUM_BLOCKS
        assert all(self.pool.ref_count(b) == 0 for b in range(NUM_BLOCKS))


def test_random_scheduler_traffic_keeps_the_pool_exact_and_leak_free():
    stats.clear()
    run_state_machine_as_test(
        SchedulerTraffic,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    # The traffic must actually reach the interesting paths, or the invariants prove little.
    print(dict(stats))
    assert stats["hit_blocks"] > 0
    assert stats["evicted"] > 0
    assert stats["admission_refused"] > 0
    assert stats["finished"] > 0
