"""The router's choice logic, without Ray: prefix affinity first, then the fewest queued tokens."""

import random

from autoscaler.lanes import LaneRule
from deployments.routing_policy import (
    PrefixAffinityTable,
    PrefixAwarePolicy,
    ReplicaLoad,
    prefix_hashes,
)

CHUNK = 4
LONG_PROMPT = 100  # tokens: a long prompt to these policies


class ManualClock:
    """The router's wall clock, set by the test: sends and completions at chosen times."""

    def __init__(self, now: float = 10.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _policy(max_entries=1000, clock=None, long_prompt=LONG_PROMPT):
    lanes = LaneRule(long_prompt, short_lanes=1)
    return PrefixAwarePolicy(CHUNK, max_entries, lanes, rng=random.Random(0), clock=clock or ManualClock())


def _hashes(tokens, salt=None):
    return prefix_hashes(tokens, CHUNK, salt)


def test_prefix_hashes_cover_full_chunks_only_and_chain():
    assert len(_hashes(list(range(11)))) == 2
    assert _hashes(list(range(8)))[0] == _hashes(list(range(4)) + [99, 98, 97, 96])[0]
    assert _hashes(list(range(8)))[1] != _hashes(list(range(4)) + [99, 98, 97, 96])[1]


def test_salts_separate_tenants():
    assert _hashes(list(range(8)), "a") != _hashes(list(range(8)), "b")


def test_matched_chunks_counts_leading_chunks_per_replica():
    table = PrefixAffinityTable(100)
    long_prompt = _hashes(list(range(40)))  # 10 chunks
    table.record("r1", long_prompt)
    table.record("r2", long_prompt[:3])
    assert table.matched_chunks(long_prompt) == {"r1": 10, "r2": 3}
    assert table.matched_chunks(_hashes([7] * 40)) == {}


def test_table_evicts_least_recently_used():
    table = PrefixAffinityTable(4)
    old, new = _hashes(list(range(16))), _hashes(list(range(100, 116)))
    table.record("r1", old)
    table.record("r1", new)
    assert len(table) == 4
    assert table.matched_chunks(new) == {"r1": 4}
    assert table.matched_chunks(old) == {}


def test_request_goes_to_the_replica_holding_its_prefix():
    policy = _policy()
    shared = list(range(64))
    policy.on_routed("r2", "a", 64, _hashes(shared))
    for name in ("r1", "r2", "r3"):
        policy.update_load(name, ReplicaLoad(queued_prompt_tokens=0, reported_at=1.0))
    prompt = shared + [500, 501]
    assert policy.rank(["r1", "r2", "r3"], len(prompt), _hashes(prompt))[0] == "r2"


def test_without_prefix_the_fewest_queued_tokens_win():
    policy = _policy()
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=900, reported_at=1.0))
    policy.update_load("r2", ReplicaLoad(queued_prompt_tokens=100, reported_at=1.0))
    policy.update_load("r3", ReplicaLoad(queued_prompt_tokens=500, reported_at=1.0))
    prompt = list(range(20))
    assert policy.rank(["r1", "r2", "r3"], len(prompt), _hashes(prompt)) == ["r2", "r3", "r1"]


def test_a_prefix_holder_loses_when_its_backlog_exceeds_the_prefill_saved():
    policy = _policy()
    shared = list(range(40))
    policy.on_routed("r1", "a", 40, _hashes(shared))
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=1000, reported_at=2.0))
    policy.update_load("r2", ReplicaLoad(queued_prompt_tokens=0, reported_at=2.0))
    assert policy.rank(["r1", "r2"], 40, _hashes(shared))[0] == "r2"


def test_what_the_router_sent_counts_until_the_next_report():
    policy = _policy()
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(reported_at=1.0))
    policy.on_routed("r1", "a", 100, _hashes(list(range(100))))
    other = list(range(1000, 1010))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r2"
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=0, reported_at=12.0))  # r1 has done it
    policy.update_load("r2", ReplicaLoad(queued_prompt_tokens=50, reported_at=12.0))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r1"


def test_a_completed_request_no_longer_counts_as_queued():
    policy = _policy()
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(reported_at=1.0))
    shared = list(range(100))
    policy.on_routed("r1", "a", 100, _hashes(shared))
    policy.on_routed("r1", "b", 100, _hashes(shared))  # a prefix hit: 100 - 96 tokens to prefill
    other = list(range(1000, 1010))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r2"
    policy.on_completed("r1", "a")
    policy.on_completed("r1", "b")
    assert policy.rank(["r1", "r2"], len(shared) + 1, _hashes(shared + [7]))[0] == "r1"


def test_ties_break_on_running_kv_tokens():
    policy = _policy()
    policy.update_load("r1", ReplicaLoad(running_kv_tokens=5000, reported_at=1.0))
    policy.update_load("r2", ReplicaLoad(running_kv_tokens=10, reported_at=1.0))
    assert policy.rank(["r1", "r2"], 8, _hashes(list(range(8))))[0] == "r2"


def test_only_candidates_are_ranked_and_a_forgotten_replica_holds_nothing():
    policy = _policy()
    prompt = list(range(40))
    policy.on_routed("gone", "a", 40, _hashes(prompt))
    assert policy.rank(["r1"], 40, _hashes(prompt)) == ["r1"]
    policy.forget("gone")
    assert policy.table.matched_chunks(_hashes(prompt)) == {}


def test_load_from_routing_stats_ignores_unknown_keys():
    load = ReplicaLoad.from_stats({"queued_prompt_tokens": 3, "free_kv_blocks": 9, "other": 1})
    assert load == ReplicaLoad(queued_prompt_tokens=3, free_kv_blocks=9)
    assert ReplicaLoad.from_stats(None) == ReplicaLoad()


def test_a_report_taken_while_a_request_queued_stops_counting_it_once_it_completes():
    clock = ManualClock(10.0)
    policy = _policy(clock=clock)
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(reported_at=1.0))
    document = list(range(900))
    policy.on_routed("r1", "first", len(document), _hashes(document))
    stale = ReplicaLoad(queued_prompt_tokens=len(document), reported_at=11.0)  # sees it queued
    policy.update_load("r1", stale)
    clock.now = 12.0
    policy.on_completed("r1", "first")
    follow_up = document + [7, 8]
    assert policy.rank(["r1", "r2"], len(follow_up), _hashes(follow_up))[0] == "r1"


def test_a_report_that_arrives_after_the_request_it_counted_completed_is_corrected():
    """The CI failure of session 8: Serve delivered r1's report, taken while the document was
    queued, after the document had completed; it then counted as queued on r1 and the follow-up
    went to the empty r2, losing the cached prefix. Short prompts here: the cost alone decides."""
    clock = ManualClock(10.0)
    policy = _policy(clock=clock, long_prompt=10_000)
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(reported_at=1.0))
    document = list(range(900))
    policy.on_routed("r1", "first", len(document), _hashes(document))
    clock.now = 12.0
    policy.on_completed("r1", "first")
    # Taken at 11.0, with the document and 100 tokens of another prompt still queued.
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=len(document) + 100, reported_at=11.0))
    follow_up = document + list(range(40))
    assert policy.rank(["r1", "r2"], len(follow_up), _hashes(follow_up))[0] == "r1"
    # A later report no longer holds it, and the completion is no longer needed to correct one.
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=0, reported_at=13.0))
    assert policy.rank(["r1", "r2"], len(follow_up), _hashes(follow_up))[0] == "r1"


def test_a_request_sent_after_a_report_was_taken_counts_until_one_sees_it():
    """Arrival order does not matter either: a report taken before a send does not count it."""
    clock = ManualClock(10.0)
    policy = _policy(clock=clock)
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(reported_at=1.0))
    policy.on_routed("r1", "a", 100, _hashes(list(range(100))))
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=0, reported_at=9.0))  # taken before the send
    other = list(range(1000, 1010))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r2"
    policy.update_load("r1", ReplicaLoad(queued_prompt_tokens=100, reported_at=11.0))  # sees it: not twice
    policy.update_load("r2", ReplicaLoad(queued_prompt_tokens=99, reported_at=11.0))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r2"
    policy.update_load("r2", ReplicaLoad(queued_prompt_tokens=101, reported_at=11.5))
    assert policy.rank(["r1", "r2"], 10, _hashes(other))[0] == "r1"


def test_a_long_prompt_joins_the_replica_busy_with_one_the_router_just_sent():
    policy = _policy()
    for name in ("r1", "r2"):
        policy.update_load(name, ReplicaLoad(queued_prompt_tokens=0, reported_at=1.0))
    first, second = list(range(1000, 1200)), list(range(2000, 2240))  # 200 and 240 tokens: long here
    policy.on_routed("r1", "first", len(first), _hashes(first))
    # r1 queues 200 tokens, the second prompt computes 240 anywhere: it waits there, r2 stays a lane.
    assert policy.rank(["r1", "r2"], len(second), _hashes(second)) == ["r1", "r2"]
    assert policy.rank(["r1", "r2"], 20, _hashes(list(range(20))))[0] == "r2"  # a short one takes the lane


def test_prompts_ranked_before_either_is_routed_see_each_other():
    """Serve awaits a probe of the chosen replica between ranking and routing: a second long
    prompt ranked in between must count the first at its first choice, then where it went."""
    policy = _policy()
    policy.update_load("r1", ReplicaLoad(running_kv_tokens=0, reported_at=1.0))
    policy.update_load("r2", ReplicaLoad(running_kv_tokens=10, reported_at=1.0))
    first, second = list(range(1000, 1200)), list(range(2000, 2200))
    assert policy.rank(["r1", "r2"], len(first), _hashes(first))[0] == "r1"
    policy.on_ranked("r1", "first", len(first), _hashes(first))
    # The same report, seen again with r1 holding more KV: on equal queues the tie would go to r2.
    policy.update_load("r1", ReplicaLoad(running_kv_tokens=50, reported_at=1.0))
    assert policy.rank(["r1", "r2"], len(second), _hashes(second))[0] == "r1"
    policy.on_routed("r2", "first", len(first), _hashes(first))  # r1 was full: it went to r2
    assert policy.rank(["r1", "r2"], len(second), _hashes(second))[0] == "r2"
    assert policy.rank(["r1", "r2"], 20, _hashes(list(range(20))))[0] == "r1"  # the lane left free
