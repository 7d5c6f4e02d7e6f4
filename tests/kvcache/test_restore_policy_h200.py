"""The restore policy on the H200 of sessions 3 and 4, replayed: why 16K and 1M tokens lost
(docs/kv_tiers.md), and exact decisions with the estimates of now. The machine is synthetic, fitted
to the TTFTs session 3 measured (docs/measurements/H200-restore_policy*)."""

from __future__ import annotations

from dataclasses import replace

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


def serve(model: RestoreCostModel, machine: Machine, tokens: int, sync_aware: bool = True) -> tuple[Decision, float]:
    """One request whose full blocks Redis holds, as the engine runs it: the decision, the
    measurements it feeds back (each prefill step, the prefetch), and its true TTFT.
    `sync_aware` False: each step measured alone, as if it had waited for the device (session 5)."""
    blocks = (tokens - 1) // BLOCK
    decision = model.decide(REDIS, 0, blocks)
    if decision.restore and decision.head_blocks:  # computed, then paused: no token sampled
        for spans, seconds, synced, saved in machine.observed_steps(0, decision.head_blocks * BLOCK, samples=False):
            model.observe_prefill(spans, seconds, synced or not sync_aware, saved)
        model.discard_unsynced_prefill()  # the engine's steps while the rest is fetched
    for spans, seconds, synced, saved in machine.observed_steps(blocks * BLOCK if decision.restore else 0, tokens):
        model.observe_prefill(spans, seconds, synced or not sync_aware, saved)
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
    settings = KVTierSettings(initial_split_fetch_slowdown=1.5)  # session 3 trusted this guess
    model = RestoreCostModel(settings, BLOCK, machine.block_nbytes, machine.flops, CHUNK)
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


@pytest.mark.parametrize("slowdown, chosen", [
    (1.65, ["recompute"] * 6 + ["split"] * 4 + ["whole"]),  # configured as measured there
    (None, ["recompute"] * 6 + ["whole"] * 5),  # unknown: no split
])
def test_on_the_h200_every_bench_document_is_within_5_percent_of_the_faster_path(slowdown, chosen):
    """bench/restore_policy.py's sequence (3 documents each at 4K, 16K, 64K, one at 256K and 1M),
    each decision corrected by what the ones before measured: exact decisions, and every TTFT
    within 5% of the faster of recompute and a whole restore."""
    machine = h200()
    model = calibrated(machine, initial_split_fetch_slowdown=slowdown)
    decisions = []
    for tokens, repeats in ((4096, 3), (16384, 3), (65536, 3), (262144, 1), (1 << 20, 1)):
        for _ in range(repeats):
            decision, ttft_s = serve(model, machine, tokens)
            decisions.append("recompute" if not decision.restore else "split" if decision.head_blocks else "whole")
            assert ttft_s <= 1.05 * faster_of_the_two(machine, tokens), (tokens, decision)
    assert decisions == chosen
    assert model.overlap.num_observations == (4 if slowdown else 0)
    assert model.overlap_known() == (slowdown is not None)


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


# --- session 4 (docs/measurements/session4-H200-restore_policy*): the 16K split ------------------
def h200_session_4() -> Machine:
    """Session 4's H200, fitted to its TTFTs: the prefill of session 3 (recompute 0.070 s at 16K, 3.09 s
    at 256K, 35.3 s at 1M measured), a whole Redis restore 10 ms + 2.0 GB/s with a 0.94 ms step
    round trip (0.295 s at 64K, 1.13 s at 256K, 4.63 s at 1M measured), and a fetch beside a head
    7.08x slower than alone (what its cost engine learnt from the two 16K splits)."""
    return replace(h200(), fetch_s=0.01, round_trip_s=0.00094, redis_bytes_per_s=2.0e9, overlap=7.08)


def logged_16k_estimates(**settings) -> RestoreCostModel:
    """The cost engine as it decided the first 16K document: 'estimates after 4096 tokens' in the log."""
    model = RestoreCostModel(KVTierSettings(**settings), BLOCK, block_nbytes(LLAMA_8B_2_LAYERS),
                             PrefillFlops.of(LLAMA_8B_2_LAYERS), CHUNK)
    model.prefill.reset((5.37e-3, 1 / 4.03e15, 1 / 4.73e13, 1e-10, 1e-30))  # (no saves: no write-through here)
    model.redis_fetch.reset((6.23e-3, 1 / 1.85e9))
    model.host_load.reset((0.112e-3, 1 / 48.7e9))
    return model


def test_session_4_replayed_the_16k_split_was_priced_at_a_guessed_slowdown_beside_the_head():
    """The log: 'restore 255 blocks (redis: 56.26 ms to restore, the first 161 recomputed meanwhile,
    106.59 ms to recompute)', then a TTFT of 0.2296 s. The head's prefill (49.8 ms) was about right;
    the fetch of the other 94 blocks was priced at 1.5 x 32.9 ms = 49.3 ms and took ~0.22 s (6.7x
    alone). Now no split is planned until that slowdown is known."""
    guessed = logged_16k_estimates(initial_split_fetch_slowdown=1.5)  # the rule of session 4
    split = guessed.decide(REDIS, 0, 255)
    assert split.restore and split.head_blocks == 160
    assert (split.restore_s, split.recompute_s) == (pytest.approx(0.0563, rel=0.01), pytest.approx(0.1066, rel=0.01))
    assert guessed.overlapped_fetch_seconds(255 - 160) == pytest.approx(1.5 * 0.0329, rel=0.01)
    assert 0.2296 / split.restore_s > 4
    now = logged_16k_estimates().decide(REDIS, 0, 255)
    assert now.head_blocks == 0 and now.restore_s == pytest.approx(0.0867, rel=0.01)


@pytest.mark.parametrize("slowdown, chosen", [
    (None, ["recompute"] * 4 + ["whole"] * 4),
    (1.5, ["recompute"] * 4 + ["split"] * 2 + ["whole"] * 2),  # session 4's rule: the guess 1.5 trusted
])
def test_session_4_h200_every_bench_document_within_5_percent_only_without_a_guessed_split(slowdown, chosen):
    """The bench's sequence of session 4 (2 documents at 4K, 16K and 64K, one at 256K and 1M). With the
    guess trusted, both 64K documents split and lose ~3x: the first split's fetch (7x the guess) is
    held back as a one-off (linear_estimate.py), so the second repeats it, as the two 16K splits did."""
    machine = h200_session_4()
    model = calibrated(machine, initial_split_fetch_slowdown=slowdown)
    decisions, ratios = [], []
    for tokens, repeats in ((4096, 2), (16384, 2), (65536, 2), (262144, 1), (1 << 20, 1)):
        for _ in range(repeats):
            decision, ttft_s = serve(model, machine, tokens)
            decisions.append("recompute" if not decision.restore else "split" if decision.head_blocks else "whole")
            ratios.append(ttft_s / faster_of_the_two(machine, tokens))
    assert decisions == chosen
    if slowdown is None:
        assert max(ratios) <= 1.05 and model.overlap.num_observations == 0
    else:
        assert min(ratios[4:6]) > 2.5 and model.overlap.coefficients[0] == pytest.approx(7.08, rel=0.01)


# --- session 5 (docs/measurements/session5-H200-restore_policy*): steps that sample nothing --------
def h200_session_5() -> Machine:
    """Session 5's H200, fitted to the recompute TTFTs of both its runs (0.0119-0.0125 / 0.058-0.059 /
    0.338-0.364 / 2.83-3.04 / 34.5-34.6 s at 4K / 16K / 64K / 256K / 1M; fitted 0.0106 / 0.0555 /
    0.354 / 2.86 / 33.8) and its calibration's one-step requests (3.9 ms a block, 9.65 ms half a
    chunk): 3.8 ms a step, 15 ms more for a chunk with context (10 of them the write-through save of
    the chunk before, 64 MiB; a guess of the split), weights at 5.6e14 and attention at 6.0e14
    FLOP/s; a whole restore 14 ms + 2.1 GB/s as the driver sees it, plus a resume step of 8.8 ms
    (0.039 / 0.090 / 0.289 / 1.09 / 4.29 s; measured 0.038 / 0.089-0.092 / 0.259-0.296 /
    1.17-1.22 / 4.36-4.78). A step that samples nothing returns after 4.8 ms, its kernels queued
    (the probe's first 8K chunk)."""
    return Machine(PrefillFlops.of(LLAMA_8B_2_LAYERS), block_nbytes(LLAMA_8B_2_LAYERS), step_s=0.0038,
                   context_s=0.005, weight_flops_per_s=5.6e14, attention_flops_per_s=6.0e14, fetch_s=0.014,
                   round_trip_s=0.00045, redis_bytes_per_s=2.1e9, load_s=0.000086, host_bytes_per_s=49.9e9,
                   launch_s=0.0048, save_bytes_per_s=6.7e9)


# Session 5's start-up probe as logged ("calibration prefill steps"): each step timed alone. The
# first two chunks of the 24K request sampled nothing and returned with their kernels queued; the
# third waited for them and for a kernel plan of its new shape (only two chunks were warmed up).
SESSION_5_PROBE_STEPS = [((0, 64), 0.003944), ((0, 4096), 0.009652), ((0, 8192), 0.004809),
                         ((8192, 8192), 0.019215), ((16384, 8192), 0.107967)]


SESSION_5_BENCH = ((4096, 3), (16384, 3), (65536, 3), (262144, 1), (1 << 20, 1))


def test_session_5_replayed_steps_timed_alone_restore_16k_at_1_5x():
    """The probe's steps timed alone put the weights at no cost (8.72e18 FLOP/s logged), and the 4K
    documents then put all their cost on attention (4.81e13 FLOP/s, a tenth of its rate): 16K was
    priced 0.109 s to recompute (0.059 s measured) against 0.081 s to restore, and restored
    (0.087-0.092 s measured, 1.47x the faster). Timed as whole requests the probe gets it right."""
    machine = h200_session_5()
    logged = RestoreCostModel(KVTierSettings(), BLOCK, machine.block_nbytes, machine.flops, CHUNK)
    logged.calibrate(**{**machine.calibration(), "prefills": [(((span,),), s) for span, s in SESSION_5_PROBE_STEPS]})
    assert 1 / logged.prefill.coefficients[1] > 1e17  # the weights at no cost, as logged
    # 'estimates after 4096 tokens' in the log, and its first 16K decision
    logged.prefill.reset((4.66e-3, 1 / 8.72e18, 1 / 4.81e13, 8.55e-3, 1e-30))
    logged.redis_fetch.reset((2.56e-3, 1 / 2.15e9))
    logged.host_load.reset((0.0859e-3, 1 / 49.9e9))
    decision = logged.decide(REDIS, 0, 255)
    # the log: 'restore 255 blocks (redis: 80.62 ms to restore, 108.62 ms to recompute)'
    assert decision.restore and decision.restore_s == pytest.approx(0.0806, rel=0.01)
    assert decision.recompute_s == pytest.approx(0.1086, rel=0.01)
    assert machine.ttft(16384, 0) > 1.5 * faster_of_the_two(machine, 16384)
    now = calibrated(machine)
    assert now.prefill_seconds(0, 16384) == pytest.approx(machine.prefill(0, 16384), rel=0.05)
    assert not now.decide(REDIS, 0, 255).restore


def test_session_5_h200_every_bench_document_within_5_percent_with_requests_timed_whole():
    machine = h200_session_5()
    model = calibrated(machine)
    for tokens in (4096, 16384, 65536, 262144, 1 << 20):  # the probe alone: within 10% at every size
        assert model.prefill_seconds(0, tokens) == pytest.approx(machine.prefill(0, tokens), rel=0.1)
    decisions, ratios = [], []
    for tokens, repeats in SESSION_5_BENCH:
        for _ in range(repeats):
            decision, ttft_s = serve(model, machine, tokens)
            decisions.append("recompute" if not decision.restore else "split" if decision.head_blocks else "whole")
            ratios.append(ttft_s / faster_of_the_two(machine, tokens))
    assert decisions == ["recompute"] * 6 + ["whole"] * 5
    assert max(ratios) <= 1.05
    for tokens in (16384, 1 << 20):  # and after serving, still
        assert model.prefill_seconds(0, tokens) == pytest.approx(machine.prefill(0, tokens), rel=0.05)
    # a restore's resume step saves nothing first: its fixed cost is not a recomputed chunk's
    assert model.resume_seconds() == pytest.approx(machine.step_s + machine.context_s, rel=0.1)


def test_session_5_after_the_first_fix_replayed_64k_recompute_priced_without_its_saves():
    """The second run (docs/measurements/session5-H200-restore_policy-after*): steps measured whole,
    but each minus the copies it waited for, and a write-through save waits for the chunk before
    it. 'estimates after 16384 tokens' priced 64K at 0.343 s to recompute (0.364-0.427 s measured)
    against 0.323 s to restore (0.296 s): recomputed, 1.30x the faster. With the saves measured
    (the machine's context cost holds them), the same sequence restores 64K."""
    machine = h200_session_5()
    logged = RestoreCostModel(KVTierSettings(), BLOCK, machine.block_nbytes, machine.flops, CHUNK)
    logged.prefill.reset((4.97e-3, 1 / 4.69e14, 1 / 3.87e14, 1e-10, 1e-30))
    logged.redis_fetch.reset((3.24e-3, 1 / 1.77e9))
    logged.host_load.reset((0.118e-3, 1 / 48.2e9))
    decision = logged.decide(REDIS, 0, 1023)  # the log: 323.25 ms to restore, 342.87 ms to recompute
    assert not decision.restore
    assert (decision.restore_s, decision.recompute_s) == (pytest.approx(0.3233, rel=0.01),
                                                          pytest.approx(0.3429, rel=0.01))
    assert machine.ttft(65536, None) > 1.2 * faster_of_the_two(machine, 65536)
