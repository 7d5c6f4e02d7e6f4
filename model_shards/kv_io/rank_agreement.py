"""Several ranks, one answer: merge the KV-tier reports of the ranks of a TP x SP world.

With tensor or sequence parallelism every rank holds its own shard of each KV block (its KV
heads, its stripe of positions) and moves it to and from Redis itself, under a key of its own
(model_shards/kv_io/namespace.py). The driver, though, keeps one host index for all of them: a block
is in Redis, or restorable, only if *every* rank's shard is. Remote outcomes also finish at
different times on different ranks, while the driver frees a host slot the moment it hears the
outcome, so a slot must not be reported before every rank is done with it.

So each rank holds its finished outcomes here; at each step with tier work the ranks exchange
what they hold (one object all-gather, kvcache never touches torch: the worker does it) and
every rank computes the same agreement from the same data: the outcomes every rank has, merged
(a fetch is a hit only if it hit everywhere, a write stored only if stored everywhere, a probe
present only where every rank found it). Those leave the hold and go to the driver, exactly
once; the rest wait for a later step.

Transfer samples, and the counts that feed metrics, are world rank 0's: the ranks move their
shards in parallel and the driver's cost model is per rank-shard (`block_nbytes` is one rank's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from protocol.kv_transfer_ops import HIT, KVTransferReport


@dataclass
class HeldOutcomes:
    """One rank's finished remote outcomes that the other ranks have not all reached yet."""

    probed: dict[int, tuple[bool, ...]] = field(default_factory=dict)  # probe id -> present per hash
    fetched: dict[int, str] = field(default_factory=dict)  # slot -> outcome
    written: dict[int, bool] = field(default_factory=dict)  # write-through slot -> stored
    redis_up: bool = True


class RankAgreement:
    def __init__(self) -> None:
        self.held = HeldOutcomes()

    def hold(self, report: KVTransferReport) -> HeldOutcomes:
        """Add this step's finished outcomes; returns a snapshot to send to the other ranks."""
        held = self.held
        held.probed.update(report.probed)
        held.fetched.update(report.fetched)
        held.written.update(report.written)
        held.redis_up = report.redis_up
        return HeldOutcomes(dict(held.probed), dict(held.fetched), dict(held.written), held.redis_up)

    def across(self, world, report: KVTransferReport) -> KVTransferReport:
        """Hold this rank's outcomes, exchange holds over `world` (a ParallelGroup: one object
        all-gather) and return the agreed report: what every rank's worker hands the driver."""
        held = self.hold(report)
        every = world.all_gather_object((held, report.redis_errors, report.blocking_seconds))
        return self.agree(report, [e[0] for e in every], [e[1] for e in every], [e[2] for e in every])

    def agree(self, report: KVTransferReport, every_rank: list[HeldOutcomes],
              every_errors: list[int], every_blocking_s: list[float]) -> KVTransferReport:
        """The report the driver gets: this rank's, with the remote outcomes replaced by those
        every rank holds (merged), which leave the hold. Same result on every rank."""
        probed = _common(every_rank, "probed", lambda values: tuple(map(all, zip(*values))))
        fetched = _common(every_rank, "fetched", _first_miss)
        written = _common(every_rank, "written", all)
        for name, agreed in (("probed", probed), ("fetched", fetched), ("written", written)):
            held = getattr(self.held, name)
            for key in agreed:
                del held[key]
        return replace(report, probed=tuple(probed.items()), fetched=tuple(fetched.items()),
                       written=tuple(written.items()), redis_up=all(h.redis_up for h in every_rank),
                       redis_errors=sum(every_errors), blocking_seconds=max(every_blocking_s))


def _common(every_rank: list[HeldOutcomes], name: str, merge) -> dict:
    """Keys that every rank holds under `name`, each with its values merged; in rank 0's order."""
    maps = [getattr(held, name) for held in every_rank]
    return {key: merge([m[key] for m in maps]) for key in maps[0] if all(key in m for m in maps[1:])}


def _first_miss(outcomes: list[str]) -> str:
    """HIT only if every rank's shard hit; otherwise the first rank's reason for the miss."""
    return next((outcome for outcome in outcomes if outcome != HIT), HIT)
