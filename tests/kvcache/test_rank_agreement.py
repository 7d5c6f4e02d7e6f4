"""Merging the KV-tier reports of several ranks (model_shards/kv_io/rank_agreement.py): exact outcomes."""

from __future__ import annotations

from model_shards.kv_io.rank_agreement import RankAgreement
from protocol.kv_transfer_ops import CHECKSUM, HIT, MISSING, KVTransferReport


def step(agreements: list[RankAgreement], reports: list[KVTransferReport]) -> list[KVTransferReport]:
    """One step on every rank: hold, exchange (as the all-gather would), agree."""
    held = [a.hold(r) for a, r in zip(agreements, reports)]
    errors = [r.redis_errors for r in reports]
    blocking = [r.blocking_seconds for r in reports]
    return [a.agree(r, held, errors, blocking) for a, r in zip(agreements, reports)]


def test_an_outcome_is_reported_once_every_rank_has_it():
    ranks = [RankAgreement(), RankAgreement()]
    first = step(ranks, [KVTransferReport(fetched=((3, HIT), (4, HIT)), written=((9, True),)),
                         KVTransferReport(fetched=((4, HIT),))])
    assert first[0].fetched == first[1].fetched == ((4, HIT),)
    assert first[0].written == ()
    second = step(ranks, [KVTransferReport(), KVTransferReport(fetched=((3, HIT),), written=((9, True),))])
    assert second[0].fetched == ((3, HIT),) and second[0].written == ((9, True),)
    third = step(ranks, [KVTransferReport(), KVTransferReport()])
    assert third[0].fetched == () and third[0].written == ()  # exactly once
    assert ranks[0].held.fetched == ranks[1].held.fetched == {}


def test_a_miss_on_any_rank_is_a_miss_and_a_write_counts_only_when_every_rank_stored():
    ranks = [RankAgreement(), RankAgreement(), RankAgreement()]
    reports = [KVTransferReport(fetched=((1, HIT), (2, HIT), (5, HIT)), written=((7, True), (8, True))),
               KVTransferReport(fetched=((1, HIT), (2, CHECKSUM), (5, MISSING)), written=((7, True), (8, False))),
               KVTransferReport(fetched=((1, HIT), (2, MISSING), (5, HIT)), written=((7, True), (8, True)))]
    merged = step(ranks, reports)
    assert all(m == merged[0] for m in merged)  # every rank computes the same agreement
    assert dict(merged[0].fetched) == {1: HIT, 2: CHECKSUM, 5: MISSING}  # the first rank's reason
    assert dict(merged[0].written) == {7: True, 8: False}


def test_probes_are_present_only_where_every_rank_found_the_block():
    ranks = [RankAgreement(), RankAgreement()]
    merged = step(ranks, [KVTransferReport(probed=((0, (True, True, False)),)),
                          KVTransferReport(probed=((0, (True, False, False)),))])
    assert merged[0].probed == ((0, (True, False, False)),)


def test_health_errors_and_blocking_time_combine_over_ranks():
    ranks = [RankAgreement(), RankAgreement()]
    merged = step(ranks, [KVTransferReport(redis_errors=1, blocking_seconds=0.5, redis_up=True),
                          KVTransferReport(redis_errors=2, blocking_seconds=0.25, redis_up=False)])
    assert merged[0].redis_errors == 3
    assert merged[0].blocking_seconds == 0.5  # the step waited for the slowest rank
    assert merged[0].redis_up is False
