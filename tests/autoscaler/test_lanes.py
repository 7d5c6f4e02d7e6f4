"""The router's rule for long prompts (autoscaler/lanes.py): exact rankings."""

from autoscaler.lanes import Candidate, LaneRule, rank_replicas

RULE = LaneRule(long_prompt_tokens=1000, short_lanes=1)


def rank(loads: dict[str, tuple[int, int]], prompt_tokens: int = 4000, rule: LaneRule = RULE) -> list[str]:
    """loads: replica -> (queued tokens, tokens the prompt would compute there)."""
    candidates = [Candidate(name, queued, uncached) for name, (queued, uncached) in loads.items()]
    return rank_replicas(candidates, prompt_tokens, rule)


def test_a_short_prompt_goes_where_queued_plus_its_own_tokens_are_fewest():
    assert rank({"a": (5000, 200), "b": (0, 200), "c": (300, 200)}, prompt_tokens=200) == ["b", "c", "a"]


def test_equal_costs_go_where_the_prompt_computes_less():
    # a holds the prefix but queues 600 more: the same start, and 600 tokens less work in all.
    assert rank({"b": (0, 800), "a": (600, 200)}, prompt_tokens=800) == ["a", "b"]


def test_a_long_prompt_joins_a_busy_replica_when_the_wait_there_is_at_most_its_own_prefill():
    # b queues 3,000 tokens (busy), the prompt is 4,000 long: it waits at most its own prefill.
    assert rank({"a": (0, 4000), "b": (3000, 4000), "c": (200, 4000)}) == ["b", "a", "c"]


def test_among_busy_replicas_within_its_slack_the_shortest_wait_wins():
    assert rank({"a": (3500, 4000), "b": (1500, 4000), "c": (0, 4000), "d": (0, 4000)}) == ["b", "a", "c", "d"]


def test_a_long_prompt_takes_a_lane_while_more_than_short_lanes_are_free():
    # b's queue (9,000) is more than the prompt's own 4,000: beyond its slack; two lanes are free.
    assert rank({"a": (0, 4000), "b": (9000, 4000), "c": (100, 4000)}) == ["a", "c", "b"]


def test_the_last_lane_stays_free_for_short_requests_while_a_busy_replica_can_take_the_prompt():
    assert rank({"a": (0, 4000), "b": (9000, 4000)}) == ["b", "a"]
    assert rank({"a": (0, 4000), "b": (9000, 4000)}, rule=LaneRule(1000, short_lanes=0)) == ["a", "b"]


def test_with_no_busy_replica_a_long_prompt_takes_the_last_lane():
    assert rank({"a": (0, 4000)}) == ["a"]
    assert rank({"a": (200, 4000), "b": (0, 4000)}) == ["b", "a"]


def test_a_long_prompt_cached_on_a_free_replica_goes_there_and_leaves_it_free():
    # 3,950 of its 4,000 tokens are cached on b: it computes 50 there, b stays a lane.
    assert rank({"a": (0, 4000), "b": (200, 50)}) == ["b", "a"]


def test_slack_counts_the_whole_prompt_so_a_cached_question_waits_for_its_document():
    # b is prefilling the document (3,900 queued); the question computes 100 there, 4,000 on a, the
    # last lane: it waits for the document instead of computing it a second time.
    assert rank({"a": (0, 4000), "b": (3900, 100)}) == ["b", "a"]
    assert rank({"a": (0, 4000), "b": (5000, 100)}) == ["b", "a"]  # beyond its slack: still not the last lane


def test_ties_break_on_the_callers_order():
    candidates = [Candidate("a", 0, 100, (5,)), Candidate("b", 0, 100, (2,))]
    assert rank_replicas(candidates, 100, RULE) == ["b", "a"]
