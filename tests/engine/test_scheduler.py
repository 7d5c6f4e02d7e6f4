"""The scheduler on its own (no torch): budgets, ordering, chunking, preemption, prefix hits."""

from __future__ import annotations

from cluster.config import SchedulerSettings
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from kvcache.block_hash import root_hash
from kvcache.coordinator import KVCacheCoordinator
from kvcache.kv_cache_manager import KVCacheManager
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken, StepOutput

BLOCK_SIZE = 4
ROOT = root_hash("test-model")


def make_scheduler(num_blocks=64, budget=16, max_num_seqs=8) -> Scheduler:
    settings = SchedulerSettings(max_tokens_per_step=budget, max_num_seqs=max_num_seqs)
    return Scheduler(settings, KVCacheCoordinator(KVCacheManager(num_blocks, BLOCK_SIZE)))


def make_request(request_id: str, num_prompt_tokens: int, first_token: int = 1, max_tokens=100) -> Request:
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), ROOT, BLOCK_SIZE)


def run_step(scheduler: Scheduler, next_token: int = 7):
    """Schedule one step and answer it the way a worker would: sample where a chunk reached the end."""
    step = scheduler.schedule()
    sampled = {}
    for request_id, num_tokens in step.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        if request.num_computed_tokens + num_tokens == request.num_tokens:
            sampled[request_id] = SampledToken(next_token)
    scheduler.update_from_output(step, StepOutput(step.step_id, sampled))
    return step


def test_long_prompt_is_chunked_by_the_budget():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("long", 40))
    chunks = [run_step(scheduler).num_scheduled_tokens["long"] for _ in range(3)]
    assert chunks == [16, 16, 8]
    assert scheduler.requests["long"].num_output_tokens == 1  # sampled after the last chunk


def test_decodes_go_first_and_prefill_gets_the_rest_of_the_budget():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("short", 3))
    run_step(scheduler)  # short: prefill, first token
    scheduler.add_request(make_request("long", 100, first_token=500))
    step = run_step(scheduler)
    assert step.num_scheduled_tokens == {"short": 1, "long": 15}
    assert list(step.num_scheduled_tokens) == ["short", "long"]
    step = run_step(scheduler)
    assert step.num_scheduled_tokens == {"short": 1, "long": 15}
    assert [r.request_id for r in step.new_requests] == []


def test_new_request_message_carries_prompt_once_then_only_growth():
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(make_request("a", 10))
    first = run_step(scheduler)
    assert [r.request_id for r in first.new_requests] == ["a"]
    assert first.new_requests[0].block_ids == ((0, 1),)  # 8 tokens in blocks of 4, one group
    second = run_step(scheduler)
    assert second.new_requests == ()
    assert second.cached_requests[0].new_block_ids == ((2,),)
    assert second.cached_requests[0].num_computed_tokens == 8


def test_preemption_frees_the_newest_request_and_resumes_it_with_its_outputs():
    scheduler = make_scheduler(num_blocks=4, budget=64)
    scheduler.add_request(make_request("old", 7))
    scheduler.add_request(make_request("new", 7, first_token=100))
    run_step(scheduler)  # both prefilled: 7 tokens in 2 blocks each, all 4 blocks used
    step = run_step(scheduler)  # the 8th token of each still fits its 2 blocks
    assert step.num_scheduled_tokens == {"old": 1, "new": 1}
    step = run_step(scheduler)  # the 9th needs a 3rd block: the newest request is preempted
    assert step.num_scheduled_tokens == {"old": 1}
    assert "new" in step.finished_request_ids  # workers drop its state in this very step
    preempted = scheduler.requests["new"]
    assert preempted.status is RequestStatus.WAITING and preempted.num_preemptions == 1
    scheduler.finish_request("old", RequestStatus.FINISHED_STOPPED)
    resumed = scheduler.schedule()
    assert [r.request_id for r in resumed.new_requests] == ["new"]
    assert resumed.new_requests[0].output_token_ids == (7, 7)  # its outputs travel back


def test_finished_request_frees_blocks_and_keeps_prefix_cached():
    scheduler = make_scheduler(num_blocks=16, budget=64)
    scheduler.add_request(make_request("a", 12))
    run_step(scheduler)
    scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert scheduler.kv_cache.device.num_free_blocks == 16
    scheduler.add_request(make_request("b", 12))
    step = run_step(scheduler)
    # 12 tokens = 3 full blocks, but the last token is always recomputed: 2 blocks hit.
    assert scheduler.requests["b"].num_prefix_hit_tokens == 8
    assert step.num_scheduled_tokens == {"b": 4}
    assert step.new_requests[0].num_computed_tokens == 8


def test_abort_of_a_waiting_request_removes_it():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    run_step(scheduler)
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.waiting
    assert scheduler.schedule().num_scheduled_tokens == {"a": 1}


def test_max_num_seqs_bounds_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    for index in range(3):
        scheduler.add_request(make_request(f"r{index}", 2, first_token=10 * index + 1))
    step = run_step(scheduler)
    assert sorted(step.num_scheduled_tokens) == ["r0", "r1"]
    assert [r.request_id for r in scheduler.waiting] == ["r2"]


def test_a_prefill_alone_takes_big_chunks_and_shrinks_while_others_decode():
    settings = SchedulerSettings(max_tokens_per_step=32, max_tokens_per_step_while_decoding=8)
    scheduler = Scheduler(settings, KVCacheCoordinator(KVCacheManager(64, BLOCK_SIZE)))
    scheduler.add_request(make_request("short", 3, first_token=500))
    scheduler.add_request(make_request("long", 100))
    assert run_step(scheduler).num_scheduled_tokens == {"short": 3, "long": 29}  # nobody decodes yet
    # "short" decodes now: the step shrinks to 8 tokens, its decode included
    assert run_step(scheduler).num_scheduled_tokens == {"short": 1, "long": 7}
    scheduler.finish_request("short", RequestStatus.FINISHED_ABORTED)
    assert run_step(scheduler).num_scheduled_tokens == {"long": 32}  # alone again: the big budget


def test_a_short_request_behind_a_long_prefill_is_admitted_at_the_next_step():
    """Running prefills go before the queue; while requests wait they take half the budget
    (prefill_share_while_waiting), so the short one starts now instead of after the long prompt."""
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("long", 100))
    assert run_step(scheduler).num_scheduled_tokens == {"long": 16}  # alone: the whole budget
    scheduler.add_request(make_request("short", 5, first_token=500))
    assert run_step(scheduler).num_scheduled_tokens == {"long": 8, "short": 5}
    # "short" decodes now (budget 16, no one waits): the long prompt takes the rest again
    assert run_step(scheduler).num_scheduled_tokens == {"long": 15, "short": 1}


def test_a_request_as_long_as_the_running_prefill_waits_its_turn():
    """Equal work: first come, first served (sharing would raise the mean time to first token)."""
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("first", 40))
    run_step(scheduler)  # 24 left
    scheduler.add_request(make_request("second", 24, first_token=500))
    assert run_step(scheduler).num_scheduled_tokens == {"first": 16}
    scheduler.add_request(make_request("third", 7, first_token=900))  # the head is still "second"
    assert run_step(scheduler).num_scheduled_tokens == {"first": 8, "second": 8}


def test_a_share_of_1_keeps_the_queue_behind_the_running_prefill():
    settings = SchedulerSettings(max_tokens_per_step=16, prefill_share_while_waiting=1.0)
    scheduler = Scheduler(settings, KVCacheCoordinator(KVCacheManager(64, BLOCK_SIZE)))
    scheduler.add_request(make_request("long", 100))
    run_step(scheduler)
    scheduler.add_request(make_request("short", 5, first_token=500))
    assert run_step(scheduler).num_scheduled_tokens == {"long": 16}
    assert [r.request_id for r in scheduler.waiting] == ["short"]


def test_a_queue_head_without_free_blocks_gives_the_budget_back_to_the_running_prefills():
    """Offered its share, the head found no free blocks: the next step the running prompts take
    the whole budget rather than leaving half of every step unused; a head that fits is offered
    its share again."""
    scheduler = make_scheduler(num_blocks=6, budget=16)  # 24 tokens of KV
    scheduler.add_request(make_request("long", 20, max_tokens=2))
    assert run_step(scheduler).num_scheduled_tokens == {"long": 16}
    scheduler.add_request(make_request("other", 8, first_token=500))
    # long's last 4 tokens (5 blocks), then other's 8 need 2 blocks of the 1 left
    assert run_step(scheduler).num_scheduled_tokens == {"long": 4}
    assert [r.request_id for r in scheduler.waiting] == ["other"]
    assert scheduler._prefill_room(16) == 16  # blocked: no share next step
    scheduler.finish_request("long", RequestStatus.FINISHED_ABORTED)
    assert run_step(scheduler).num_scheduled_tokens == {"other": 8}  # admission moved: not blocked
    scheduler.finish_request("other", RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_request("third", 20, first_token=900))
    run_step(scheduler)  # third prefills 16, 4 left
    scheduler.add_request(make_request("fourth", 3, first_token=950))
    assert scheduler._prefill_room(16) == 8  # a shorter head waits: the share is back
