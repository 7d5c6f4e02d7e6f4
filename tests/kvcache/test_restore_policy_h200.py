"""The restore policy on the H200 of session 3, replayed: why 16K and 1M tokens lost
(docs/kv_tiers.md), and exact decisions with the estimates of now. The machine is synthetic, fitted
to the TTFTs session 3 measured (docs/measurements/H200-restore_policy*)."""

from __future__ import annotations

import pytest
from test_cost_model import BLOCK, CHUNK, LLAMA_8B_2_LAYERS, Machine, block_nbytes, calibrated

from cluster.config import KVTierSettings
from kvcache.tiers.cost_model import Decision, PrefillFlops, RestoreCostModel
from kvcache.tiers.host_index import REDIS


def h200() -> Machine:
    """The H200 of session 3 (docs/measurements/H200-restore_policy*.txt, Llama-3-8B shape, 2 layers,
    8K-token chunks), fitted to its TTFTs: recompute 3.0 s at 256K and 35.3 s at 1M (attention
    at 5.8e14 FLOP/s, ~34 ms a chunk besides), a whole Redis restore 0.107 s at 16K and 1.19 s at
    256K (18 ms + 1.9 GB/s as the driver sees it, of which 2 x 7 ms are step round trips the
    worker does not see), and a fetch beside a head 1.65x slower (1.15 GB/s at 1M)."""
    return Machine(PrefillFlops.of(LLAMA_8B_2_LAYERS), block_nbytes(LLAMA_8B_2_LAYERS), step_s=0.005,
                   context_s=0.011, weight_flops_per_s=400e12, attention_flops_per_s=5.8e14, fetch_s=0.018,
                   round_trip_s=0.007, redis_bytes_per_s=1.9e9, overlap=1.65, load_s=0.0004, host_bytes_per_s=45e9)


def serve(model: RestoreCostModel, machine: Machine, tokens: int) -> tuple[Decision, float]:
    """One request whose full blocks Redis holds, as the engine runs it: the decision, the
    measurements it feeds back (each prefill step, the prefetch), and its true TTFT."""
    blocks = (tokens - 1) // BLOCK
    decision = model.decide(REDIS, 0, blocks)
    computed = [(0, tokens)] if not decision.restore else [(0, decision.head_blocks * BLOCK), (blocks * BLOCK, tokens)]
    for start, end in computed:
        for step_start in range(start, end, CHUNK):
            count = min(CHUNK, end - step_start)
            model.observe_prefill([(step_start, count)], machine.step(step_start, count))
    if not decision.restore:
        return decision, machine.ttft(tokens, None)
    rest = blocks - decision.head_blocks
    overlapped = decision.head_blocks > 0
    model.observe_redis_restore(rest, (machine.overlap if overlapped else 1.0) * machine.fetch(rest), overlapped)
    return decision, machine.ttft(tokens, decision.head_blocks)


def faster_of_the_two(machine: Machine, tokens: int) -> float:
    return min(machine.ttft(tokens, None), machine.ttft(tokens, 0))


def test_the_session_3_probe_misreads_the_h200_and_restores_16k_tokens_at_1_3x():
    """A block and two chunks cannot tell the second chunk's extra (context: gathers, merges)
    from attention: the fit drops the weights' cost and puts attention at ~1/4 of its rate
    (1.5e14 here, 1.48e14 on the H200), so the prefill estimate is 3.5x high at 256K and the
    16K prefix is restored as a split, with a 4 ms fixed cost of a prefetch (2.45 ms on the H200)
    where the driver sees 18 ms. (Session 3 lost 1.12x at its best of three 16K documents and
    chose a restore for the first; the decision rule of today still loses 1.3x on that probe.)"""
    machine = h200()
    model = RestoreCostModel(KVTierSettings(), BLOCK, machine.block_nbytes, machine.flops, CHUNK)
    model.calibrate(**machine.calibration("session 3"))
    assert 1 / model.prefill.coefficients[2] < 2e14  # 5.8e14 in truth
    assert model.prefill_seconds(0, 262144) > 2 * machine.prefill(0, 262144)
    assert model.fetch_seconds(1) < machine.fetch(1) / 4
    decision = model.decide(REDIS, 0, 16384 // BLOCK - 1)
    assert decision.restore and decision.head_blocks > 0
    assert machine.ttft(16384, decision.head_blocks) > 1.3 * faster_of_the_two(machine, 16384)


def test_the_probe_now_calibrates_the_h200_prefill_and_the_fixed_cost_of_a_prefetch():
    machine = h200()
    model = calibrated(machine)
    for tokens in (4096, 16384, 65536, 262144, 1 << 20):
        assert model.prefill_seconds(0, tokens) == pytest.approx(machine.prefill(0, tokens), rel=0.01)
    assert model.prefill.coefficients[3] == pytest.approx(machine.context_s, rel=0.01)  # a chunk's context
    for blocks in (1, 256, 16384):  # the worker's timings plus two step round trips
        assert model.fetch_seconds(blocks) == pytest.approx(machine.fetch(blocks), rel=0.01)


def test_on_the_h200_every_bench_document_is_within_5_percent_of_the_faster_path():
    """bench/restore_policy.py's sequence (3 documents each at 4K, 16K, 64K, one at 256K and 1M),
    each decision corrected by what the ones before measured: exact decisions, and every TTFT
    within 5% of the faster of recompute and a whole restore."""
    machine = h200()
    model = calibrated(machine)
    chosen = []
    for tokens, repeats in ((4096, 3), (16384, 3), (65536, 3), (262144, 1), (1 << 20, 1)):
        for _ in range(repeats):
            decision, ttft_s = serve(model, machine, tokens)
            chosen.append("recompute" if not decision.restore else "split" if decision.head_blocks else "whole")
            assert ttft_s <= 1.05 * faster_of_the_two(machine, tokens), (tokens, decision)
    assert chosen == ["recompute"] * 6 + ["split"] * 4 + ["whole"]
    assert model.overlap.coefficients[0] == pytest.approx(machine.overlap, rel=0.01)


def test_no_probe_is_sent_for_a_prefix_recomputing_wins():
    """A probe's round trip is a pure loss when the answer is recompute: at 16K the pre-probe
    decision (every block assumed in Redis) already says recompute."""
    model = calibrated(h200())
    assert not model.decide(REDIS, 0, 16384 // BLOCK - 1).restore
    assert model.decide(REDIS, 0, 65536 // BLOCK - 1).restore


def test_a_split_fetch_corrects_the_overlap_and_leaves_the_alone_rate():
    """Session 3's 1M miss: fetches beside a head (1.15 GB/s) pulled the one fetch estimate down,
    and the split was planned at the alone rate: head 389K tokens, 6.41 s against 4.49 s."""
    machine = h200()
    model = calibrated(machine)
    fetch_before = list(model.redis_fetch.coefficients)
    rest = 2000
    model.observe_redis_restore(rest, machine.overlap * machine.fetch(rest), overlapped=True)
    assert model.redis_fetch.coefficients == fetch_before
    assert model.overlap.coefficients[0] == pytest.approx(machine.overlap, rel=0.01)
    decision = model.decide(REDIS, 0, (1 << 20) // BLOCK - 1)
    assert decision.restore and decision.head_blocks == 0  # a split would lose: whole
    assert machine.ttft(1 << 20, 0) == pytest.approx(faster_of_the_two(machine, 1 << 20))


def test_a_split_must_beat_the_whole_restore_by_the_margin():
    machine = h200()
    model = calibrated(machine, restore_margin=0.0)
    model.observe_redis_restore(100, machine.overlap * machine.fetch(100), overlapped=True)
    blocks = 262144 // BLOCK - 1
    split = model.decide(REDIS, 0, blocks)
    assert split.head_blocks > 0
    gain = model.restore_seconds(REDIS, blocks) / split.restore_s - 1
    assert gain > 0
    below = RestoreCostModel(KVTierSettings(restore_margin=gain - 0.01), BLOCK, machine.block_nbytes, machine.flops,
                             CHUNK)
    above = RestoreCostModel(KVTierSettings(restore_margin=gain + 0.01), BLOCK, machine.block_nbytes, machine.flops,
                             CHUNK)
    for other in (below, above):
        other.calibrate(**machine.calibration())
        other.observe_redis_restore(100, machine.overlap * machine.fetch(100), overlapped=True)
    assert below.decide(REDIS, 0, blocks).head_blocks == split.head_blocks
    whole = above.decide(REDIS, 0, blocks)
    assert whole.restore and whole.head_blocks == 0
    assert whole.restore_s == pytest.approx(model.restore_seconds(REDIS, blocks))
