"""The prefill backlog a replica reports to the autoscaler: tokens net of prefix hits, seconds."""

from __future__ import annotations

import pytest

from cluster.config import KVTierSettings, SchedulerSettings
from engine.backlog import measure_backlog
from engine.request import Request
from engine.scheduler import Scheduler
from kvcache.block_hash import root_hash
from kvcache.coordinator import KVCacheCoordinator
from kvcache.kv_cache_manager import KVCacheManager
from kvcache.tiers.cost_model import PrefillFlops, RestoreCostModel
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken, StepOutput

BLOCK_SIZE = 4
ROOT = root_hash("test-model")


def make_request(request_id: str, prompt: list[int], root: bytes = ROOT) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8), root, BLOCK_SIZE)


def make_scheduler(budget: int = 16, prefix_caching: bool = True) -> Scheduler:
    cache = KVCacheManager(64, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerSettings(max_tokens_per_step=budget), KVCacheCoordinator(cache))


def cost_model(tokens_per_s: float = 10.0, flops: PrefillFlops | None = None) -> RestoreCostModel:
    return RestoreCostModel(KVTierSettings(initial_prefill_tokens_per_s=tokens_per_s), BLOCK_SIZE, 1, flops)


def run_step(scheduler: Scheduler) -> None:
    step = scheduler.schedule()
    sampled = {
        request_id: SampledToken(7)
        for request_id, count in step.num_scheduled_tokens.items()
        if scheduler.requests[request_id].num_computed_tokens + count == scheduler.requests[request_id].num_tokens
    }
    scheduler.update_from_output(step, StepOutput(step.step_id, sampled))


DOCUMENT = list(range(100, 140))  # 40 tokens: 10 blocks


def test_questions_on_one_queued_document_count_its_prefill_once():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("first", DOCUMENT + [1, 2]))
    scheduler.add_request(make_request("second", DOCUMENT + [3, 4, 5]))
    assert [r.num_expected_hit_tokens for r in scheduler.waiting] == [0, 40]
    backlog = measure_backlog(scheduler.waiting, scheduler.running, cost_model())
    assert backlog.num_tokens == 42 + 3
    assert backlog.seconds == pytest.approx(4.5, abs=0.01)  # 45 tokens at 10 tokens/s (+ 2 ms a step)


def test_another_tenant_shares_nothing_and_prefix_caching_off_expects_no_hits():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", DOCUMENT + [1]))
    scheduler.add_request(make_request("b", DOCUMENT + [1], root=root_hash("test-model", "tenant-b")))
    assert scheduler.waiting[1].num_expected_hit_tokens == 0
    uncached = make_scheduler(prefix_caching=False)
    uncached.add_request(make_request("a", DOCUMENT + [1]))
    uncached.add_request(make_request("b", DOCUMENT + [2]))
    assert uncached.waiting[1].num_expected_hit_tokens == 0


def test_a_prompt_in_the_device_cache_leaves_only_its_last_block_to_compute():
    scheduler = make_scheduler(budget=64)
    scheduler.add_request(make_request("first", DOCUMENT))
    run_step(scheduler)  # prefilled and cached; now decoding
    scheduler.add_request(make_request("again", DOCUMENT))
    # The last prompt token is always computed, so the 10th block is not a hit.
    assert scheduler.waiting[0].num_expected_hit_tokens == 36


def test_a_chunked_prefill_in_progress_counts_its_remaining_tokens():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("long", list(range(1, 41))))
    run_step(scheduler)
    backlog = measure_backlog(scheduler.waiting, scheduler.running, cost_model())
    assert (backlog.num_tokens, backlog.num_decoding, backlog.longest_request_tokens) == (24, 0, 40)
    run_step(scheduler)
    run_step(scheduler)
    backlog = measure_backlog(scheduler.waiting, scheduler.running, cost_model())
    assert (backlog.num_tokens, backlog.seconds, backlog.num_decoding) == (0, 0.0, 1)
    assert backlog.longest_request_tokens == 41  # the prompt and its first output token


def test_seconds_price_the_quadratic_attention_of_late_positions():
    flops = PrefillFlops(per_token=1.0, per_key=1.0)
    cost = cost_model(tokens_per_s=1.0, flops=flops)  # 1 FLOP/s per weights-only token
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", list(range(1, 9))))
    backlog = measure_backlog(scheduler.waiting, scheduler.running, cost)
    assert backlog.seconds == pytest.approx(8 + 36, abs=0.01)  # 8 tokens of weights, 1 + 2 + ... + 8 attended keys
