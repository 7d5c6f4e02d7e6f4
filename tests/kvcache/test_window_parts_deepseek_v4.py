"""A hybrid model's window parts in the tiers, on the driver alone (no torch, no Redis): which
blocks keep one, how host memory splits, where a restore ends when one is missing, what the cost
model prices. Sizes are DeepSeek-V4's flash shape (43 layers, bf16, 128-token blocks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cluster.config import KVTierSettings
from kvcache.block_hash import hash_full_blocks, root_hash
from kvcache.tier_manager import TierManager
from kvcache.tiers.cost_model import RestoreCostModel
from kvcache.tiers.window_parts import window_part_key
from protocol.host_slots import HostSlots, split_host_bytes
from protocol.kv_transfer_ops import HIT, MISSING, KVTransferReport

BLOCK = 128
COMPRESSED = 842_752  # bytes of a block's compressed part (model_shards/deepseek_v4/kv_pages.py)
WINDOW = 5_943_296  # bytes of its window part: 87.6% of the block


@dataclass
class Request:
    request_id: str
    num_tokens: int
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)


@dataclass
class Step:
    total_scheduled_tokens: int = 0

    def scheduled_spans(self) -> list[tuple[int, int]]:
        return []


def computed_request(request_id: str, num_tokens: int, seed: int = 0) -> Request:
    tokens = [(seed * 7919 + index) % 1000 for index in range(num_tokens)]
    hashes = hash_full_blocks(tokens, BLOCK, root_hash("window-parts-test"))
    return Request(request_id, num_tokens, num_tokens - 1, hashes)


def make_tiers(host_bytes: int, interval: int = 4, redis: bool = False) -> TierManager:
    settings = KVTierSettings(host_bytes=host_bytes, restore_policy="always", window_part_interval_blocks=interval,
                              redis_urls=("redis://unused",) if redis else ())
    return TierManager(settings, BLOCK, COMPRESSED, window_blocks=1, window_nbytes=WINDOW)


def write_through(tiers: TierManager, request: Request):
    """The request computed every block but its last token's: its blocks go to host."""
    num_blocks = len(request.block_hashes)
    tiers.commit(tiers.plan_restore(request, num_device_blocks=0), new_block_ids=[])  # admitted, nothing cached
    tiers.on_blocks_computed(request, list(range(num_blocks)), [100 + index for index in range(num_blocks)])
    ops = tiers.take_ops((), idle=False)
    tiers.on_step_done(Step(), None, 0.0)
    return ops


def test_host_memory_splits_into_block_slots_and_a_small_window_part_pool():
    host_bytes = 64 << 30
    split = split_host_bytes(host_bytes, COMPRESSED, WINDOW, 16)
    # 43337 blocks: 1585664 bytes each, a compressed part and 2/16 of a window part
    assert split == HostSlots(43_337, 5_417)
    assert 0 <= host_bytes - split.num_blocks * COMPRESSED - split.num_window_parts * WINDOW < WINDOW
    assert split_host_bytes(host_bytes, COMPRESSED + WINDOW) == HostSlots(10_126, 0)  # one slot per whole block
    assert split_host_bytes(host_bytes, COMPRESSED, WINDOW, 1) == HostSlots(10_126, 10_126)  # every block whole
    assert split_host_bytes(COMPRESSED + WINDOW, COMPRESSED, WINDOW, 16) == HostSlots(1, 1)
    assert split_host_bytes(COMPRESSED + WINDOW - 1, COMPRESSED, WINDOW, 16) == HostSlots(0, 0)


def test_window_parts_are_kept_at_checkpoints_and_at_the_end_of_what_was_computed():
    tiers = make_tiers(1 << 30)
    request = computed_request("a", 10 * BLOCK + 5)  # full blocks 0 .. 9
    ops = write_through(tiers, request)
    base = tiers.host.num_slots
    assert [block for block, _ in ops.saves] == list(range(10))
    # checkpoints 3 and 7 (every 4th block), and the last full block 9
    assert [(block, slot - base) for block, slot in ops.window_saves] == [(103, 0), (107, 1), (109, 2)]
    # A prompt of whole blocks: its own hit ends at block 8 (the last token is always computed);
    # block 9 is computed with the first decoded token, then as the last full block.
    exact = computed_request("b", 10 * BLOCK, seed=1)
    assert [block for block, _ in write_through(tiers, exact).window_saves] == [103, 107, 108]


def test_a_restore_ends_at_the_last_block_whose_window_part_is_in_host_memory():
    tiers = make_tiers(1 << 30)
    document = computed_request("doc", 10 * BLOCK + 5)
    write_through(tiers, document)
    whole = Request("whole", 10 * BLOCK + 30, block_hashes=document.block_hashes)
    plan = tiers.plan_restore(whole, num_device_blocks=0)
    assert len(plan.slots) == 10 and plan.window_slots == (tiers.windows.lookup(document.block_hashes[9]),)
    # A request sharing blocks 0 .. 5 only: block 5 has no window part, block 3 has one.
    partial = Request("partial", 6 * BLOCK + 30, block_hashes=document.block_hashes[:6])
    plan = tiers.plan_restore(partial, num_device_blocks=0)
    assert plan.slots == tuple(range(4)) and plan.window_slots == (tiers.windows.lookup(document.block_hashes[3]),)
    tiers.commit(plan, new_block_ids=[50, 51, 52, 53], window_table=[60, 61, 62, 63, 64, 65])
    ops = tiers.take_ops((), idle=False)
    assert ops.loads == ((0, 50), (1, 51), (2, 52), (3, 53)) and ops.window_loads == ((plan.window_slots[0], 63),)
    tiers.on_step_done(Step(), None, 0.0)
    assert tiers.num_pending == 0


def test_without_any_window_part_nothing_is_restored():
    tiers = make_tiers(1 << 30, interval=16)
    document = computed_request("doc", 10 * BLOCK + 5)
    write_through(tiers, document)
    partial = Request("partial", 6 * BLOCK + 30, block_hashes=document.block_hashes[:6])
    plan = tiers.plan_restore(partial, num_device_blocks=0)
    assert plan.slots == () and plan.window_slots == ()


def test_a_redis_restore_ends_where_redis_holds_a_window_part_and_fetches_only_that_one():
    tiers = make_tiers(1 << 30, redis=True)
    document = computed_request("doc", 10 * BLOCK + 5)
    request = Request("r", 6 * BLOCK + 30, block_hashes=document.block_hashes[:6])
    assert tiers.plan_restore(request, num_device_blocks=0) is None  # probing
    [(probe_id, probed)] = tiers.take_ops((), idle=False).probes
    assert probed == (*document.block_hashes[:6], *map(window_part_key, document.block_hashes[:6]))
    present = (True,) * 6 + (False, False, True, False, False, False)  # window parts: block 2 only
    tiers.on_step_done(Step(), KVTransferReport(probed=((probe_id, present),)), 0.0)
    fetches = tiers.take_ops((), idle=False).fetches
    assert [key for key, _ in fetches] == [*document.block_hashes[:3], window_part_key(document.block_hashes[2])]
    report = KVTransferReport(fetched=tuple((slot, HIT) for _, slot in fetches))
    tiers.on_step_done(Step(), report, 0.0)
    plan = tiers.plan_restore(request, num_device_blocks=0)
    assert len(plan.slots) == 3 and plan.window_slots == (fetches[-1][1],)


def test_a_window_part_that_fails_to_arrive_cuts_the_redis_restore_back():
    tiers = make_tiers(1 << 30, redis=True)
    document = computed_request("doc", 10 * BLOCK + 5)
    request = Request("r", 6 * BLOCK + 30, block_hashes=document.block_hashes[:6])
    tiers.plan_restore(request, num_device_blocks=0)
    [(probe_id, _)] = tiers.take_ops((), idle=False).probes
    tiers.on_step_done(Step(), KVTransferReport(probed=((probe_id, (True,) * 12),)), 0.0)
    fetches = tiers.take_ops((), idle=False).fetches
    assert len(fetches) == 7  # six blocks, the window part of the last
    outcomes = tuple((slot, HIT) for _, slot in fetches[:-1]) + ((fetches[-1][1], MISSING),)
    tiers.on_step_done(Step(), KVTransferReport(fetched=outcomes), 0.0)
    plan = tiers.plan_restore(request, num_device_blocks=0)
    assert plan.slots == () and tiers.num_pending == 0


@pytest.mark.parametrize("num_blocks", [1, 8, 64])
def test_a_hybrid_restore_is_priced_by_the_bytes_it_moves(num_blocks):
    settings = KVTierSettings(initial_host_bandwidth_bytes_per_s=10e9, initial_redis_bandwidth_bytes_per_s=2e9)
    hybrid = RestoreCostModel(settings, BLOCK, COMPRESSED, window_nbytes=WINDOW)
    whole = RestoreCostModel(settings, BLOCK, COMPRESSED + WINDOW)  # every block with its window part
    assert hybrid.restore_nbytes(num_blocks) == num_blocks * COMPRESSED + WINDOW
    assert hybrid.restore_nbytes(0) == 0
    fixed_load_s, fixed_fetch_s = whole.load_seconds(1) - (COMPRESSED + WINDOW) / 10e9, whole.fetch_seconds(1) - (
        COMPRESSED + WINDOW) / 2e9
    assert hybrid.load_seconds(num_blocks) == pytest.approx(fixed_load_s + (num_blocks * COMPRESSED + WINDOW) / 10e9)
    assert hybrid.fetch_seconds(num_blocks) == pytest.approx(fixed_fetch_s + (num_blocks * COMPRESSED + WINDOW) / 2e9)
    assert whole.fetch_seconds(num_blocks) - hybrid.fetch_seconds(num_blocks) == pytest.approx(
        (num_blocks - 1) * WINDOW / 2e9)


def test_a_hybrid_model_without_room_for_a_window_part_has_no_host_tier():
    """Blocks no restore could end at are never kept: the tiers are off, not silently wrong."""
    settings = KVTierSettings(host_bytes=COMPRESSED + WINDOW - 1)
    assert TierManager(settings, BLOCK, COMPRESSED, window_blocks=1, window_nbytes=WINDOW).host is None
    assert TierManager(KVTierSettings(host_bytes=1 << 30), BLOCK, COMPRESSED, window_blocks=1).host is None
    assert TierManager(settings, BLOCK, COMPRESSED + WINDOW - 1).host.num_slots == 1  # a dense model's
