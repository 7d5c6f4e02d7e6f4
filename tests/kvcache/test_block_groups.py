"""KV block groups for hybrid models (no torch): a sliding window frees the blocks it leaves, a
prefix hit is what every group can serve, an allocation succeeds in every group or none, and the
step message carries one table per group. Exact block ids throughout."""

from __future__ import annotations

from cluster.config import KVTierSettings, SchedulerSettings
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from kvcache.block_groups import KVCacheGroupSpec, SlidingWindowGroup
from kvcache.block_hash import root_hash
from kvcache.coordinator import KVCacheCoordinator
from kvcache.kv_cache_manager import KVCacheManager
from kvcache.sliding_window_manager import NULL_BLOCK, SlidingWindowManager
from kvcache.tier_manager import TierManager
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken, StepInput, StepOutput

BLOCK_SIZE = 4
WINDOW = 6  # tokens: a chunk starting at token s reads [s - 6, s), at most 2 blocks back
ROOT = root_hash("hybrid-test")


def make_request(request_id: str, num_tokens: int, first_token: int = 1) -> Request:
    prompt = list(range(first_token, first_token + num_tokens))
    return Request(request_id, prompt, SamplingParams(max_tokens=4), ROOT, BLOCK_SIZE)


def make_coordinator(full_blocks=32, window_blocks=8) -> KVCacheCoordinator:
    window = SlidingWindowGroup(KVCacheGroupSpec("window", "sliding_window", WINDOW),
                                SlidingWindowManager(window_blocks, BLOCK_SIZE, WINDOW))
    return KVCacheCoordinator(KVCacheManager(full_blocks, BLOCK_SIZE), extra_groups=[window])


def compute(coordinator: KVCacheCoordinator, request: Request, chunk: int) -> None:
    """Allocate and 'compute' the request's prompt chunk by chunk, as the scheduler would."""
    while request.num_computed_tokens < request.num_tokens:
        end = min(request.num_tokens, request.num_computed_tokens + chunk)
        hit = coordinator.lookup(request) if request.num_computed_tokens == 0 else None
        if hit is not None:
            request.num_computed_tokens = hit.num_tokens
            end = max(end, hit.num_tokens + 1)
        assert coordinator.allocate(request, end, hit) is not None
        request.num_computed_tokens = end
        coordinator.on_tokens_computed(request)


def test_the_window_frees_blocks_it_has_left_and_keeps_them_findable():
    coordinator = make_coordinator()
    request = make_request("a", 20)
    compute(coordinator, request, chunk=4)
    full, window = coordinator.block_tables("a")
    assert full == (0, 1, 2, 3, 4)
    # next chunk would start at 20: it reads [14, 20) = blocks 3 and 4; blocks 0-2 are freed
    assert window == (NULL_BLOCK, NULL_BLOCK, NULL_BLOCK, 3, 4)
    manager = coordinator.extra_groups[0].manager
    assert manager.num_free_blocks == 8 - 2
    assert [manager.pool.lookup(h) for h in request.block_hashes[:3]] == [0, 1, 2]  # freed, still cached


def test_a_prefix_hit_is_what_every_group_can_serve():
    coordinator = make_coordinator()
    first = make_request("a", 16)
    compute(coordinator, first, chunk=8)
    coordinator.free("a")
    again = make_request("b", 17)  # the same 16 tokens + 1: at most 4 blocks can hit
    hit = coordinator.lookup(again)
    assert hit.device_block_ids == (0, 1, 2, 3) and hit.num_tokens == 16
    new_blocks = coordinator.allocate(again, 17, hit)
    assert new_blocks == ([4], [4])  # one new block in each group; the window's hits are retained
    assert coordinator.block_tables("b") == ((0, 1, 2, 3, 4), (NULL_BLOCK, NULL_BLOCK, 2, 3, 4))


def test_an_evicted_window_block_shortens_the_hit_to_what_the_window_still_holds():
    coordinator = make_coordinator(window_blocks=4)
    first = make_request("a", 16)
    compute(coordinator, first, chunk=4)
    coordinator.free("a")  # window pool free queue, next to evict first: 0, 1, 3, 2
    other = make_request("x", 4, first_token=500)
    coordinator.allocate(other, 4)  # takes window block 0 (the hash of a's block 0 is gone)
    hit = coordinator.lookup(make_request("b", 17))
    assert hit.num_tokens == 16  # blocks 2 and 3 of the window still cached: full hit
    coordinator.allocate(make_request("y", 8, first_token=900), 8)  # takes window blocks 1 and 3
    hit = coordinator.lookup(make_request("c", 17))
    assert hit.device_block_ids == () and hit.num_tokens == 0  # neither (2, 3) nor (0, 1) is whole


def test_allocation_is_all_or_nothing_across_groups():
    coordinator = make_coordinator(full_blocks=32, window_blocks=2)
    request = make_request("a", 12)
    assert coordinator.allocate(request, 12) is None  # the window needs 3 blocks at once, has 2
    assert coordinator.device.num_free_blocks == 32 and coordinator.extra_groups[0].num_free_blocks == 2
    assert coordinator.allocate(request, 8) == ([0, 1], [0, 1])


def test_the_step_message_carries_one_table_per_group():
    scheduler = Scheduler(SchedulerSettings(max_tokens_per_step=8, max_num_seqs=4), make_coordinator())
    scheduler.add_request(make_request("a", 12))
    first = scheduler.schedule()
    assert first.new_requests[0].block_ids == ((0, 1), (0, 1))
    scheduler.update_from_output(first, StepOutput(first.step_id))
    second = scheduler.schedule()
    assert second.cached_requests[0].new_block_ids == ((2,), (2,))
    scheduler.update_from_output(second, StepOutput(second.step_id, {"a": SampledToken(5)}))
    assert scheduler.kv_cache.block_tables("a")[1] == (NULL_BLOCK, 1, 2)  # [6, 12) is the window
    scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert scheduler.kv_cache.extra_groups[0].num_free_blocks == 8


def make_tiered_coordinator(full_blocks=8, window_blocks=6) -> KVCacheCoordinator:
    """A hybrid model with a host tier: 100-byte blocks with 100-byte window parts, one window part
    every 16 blocks and at each sequence's end: 32 block slots and 4 window-part slots (ids 32-35)."""
    window = SlidingWindowGroup(KVCacheGroupSpec("window", "sliding_window", WINDOW),
                                SlidingWindowManager(window_blocks, BLOCK_SIZE, WINDOW))
    tiers = TierManager(KVTierSettings(host_bytes=3600, restore_policy="always"), BLOCK_SIZE, block_nbytes=100,
                        window_blocks=window.manager.blocks_in_window, window_nbytes=100)
    device = KVCacheManager(full_blocks, BLOCK_SIZE, on_evict=tiers.on_device_evict)
    tiers.track_device(device.pool)
    return KVCacheCoordinator(device, tiers, [window])


def test_hybrid_blocks_are_written_through_with_their_window_part_and_restored_into_fresh_window_blocks():
    coordinator = make_tiered_coordinator()
    compute(coordinator, make_request("a", 16), chunk=8)
    ops = coordinator.take_transfers((), idle=False)
    # computed [0, 8) then [8, 16): every block saved, and the window parts of the last two (where
    # this sequence's hits end) before the window freed them
    assert ops.saves == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert ops.window_saves == ((2, 32), (3, 33))
    coordinator.on_step_done(StepInput(0), None, 0.0)
    coordinator.free("a")
    compute(coordinator, make_request("x", 24, first_token=500), chunk=8)  # evicts a's blocks in both groups
    coordinator.free("x")
    coordinator.take_transfers((), idle=False)
    coordinator.on_step_done(StepInput(1), None, 0.0)
    again = make_request("b", 17)
    hit = coordinator.lookup(again)
    assert (hit.device_block_ids, hit.restore.slots, hit.host_tokens) == ((), (0, 1, 2, 3), 16)
    coordinator.allocate(again, 17, hit)
    full, window = coordinator.block_tables("b")
    assert window[:2] == (NULL_BLOCK, NULL_BLOCK) and len(full) == len(window) == 5
    ops = coordinator.take_transfers((), idle=False)
    assert ops.loads == tuple(zip((0, 1, 2, 3), full[:4]))
    assert ops.window_loads == ((32, window[2]), (33, window[3]))  # the last 2 restored: the window of 16
