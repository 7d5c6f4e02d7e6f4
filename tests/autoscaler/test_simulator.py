"""The simulator: exact times on hand-made traces, determinism, the CLI's JSON, and the goal."""

from __future__ import annotations

import json

import pytest

from autoscaler.simulator.experiment import Scenario, compare, simulate
from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.replica import Job, SimReplica
from autoscaler.simulator.results import SloRule, ttft_s
from autoscaler.simulator.trace import BLOCK_TOKENS, TraceError, TraceRequest, read_trace, write_trace
from autoscaler.simulator.trace_gen import TraceShape, generate_trace
from cluster.cli import main
from cluster.config import LongctxConfig

HARDWARE = ReplicaHardware()
DOCUMENT = tuple(range(100, 100 + 400))  # a 204,800-token document: 400 Mooncake blocks


def config(**autoscaling) -> LongctxConfig:
    return LongctxConfig.model_validate({"autoscaling": {"enabled": True, "max_replicas": 16, **autoscaling}})


def question(arrival_s: float, last_block: int, output: int = 10) -> TraceRequest:
    return TraceRequest(arrival_s, len(DOCUMENT) * BLOCK_TOKENS + 100, output, DOCUMENT + (last_block,))


def short(arrival_s: float, block: int) -> TraceRequest:
    return TraceRequest(arrival_s, 1000, 10, (block, block + 1))


def test_a_prompt_on_an_idle_replica_takes_its_prefill_time_and_the_next_waits_behind_it():
    scenario = Scenario(config(min_replicas=1, max_replicas=1))
    run, _ = simulate([question(0.0, 1), short(1.0, 9000)], "queued-context", scenario)
    long_ttft = HARDWARE.prefill_seconds(0, 204_900)
    assert ttft_s(run.jobs[0]) == pytest.approx(long_ttft)
    # FCFS prefill: the short request waits for the rest of the long one, then computes its own.
    assert ttft_s(run.jobs[1]) == pytest.approx(long_ttft - 1.0 + HARDWARE.prefill_seconds(0, 1000))


def test_a_second_long_prompt_waits_behind_the_first_and_leaves_the_other_replica_to_short_requests():
    scenario = Scenario(config(min_replicas=2, max_replicas=2))
    other_document = TraceRequest(1.0, 204_900, 10, tuple(range(5000, 5401)))
    run, _ = simulate([question(0.0, 1), other_document, short(2.0, 9000)], "queued-context", scenario)
    first = HARDWARE.prefill_seconds(0, 204_900)
    # 204,900 queued <= its own 204,900 to compute: it waits there, its TTFT at most twice its prefill.
    assert ttft_s(run.jobs[1]) == pytest.approx(first - 1.0 + first)
    assert ttft_s(run.jobs[2]) == pytest.approx(HARDWARE.prefill_seconds(0, 1000))  # the free lane


def test_a_second_question_on_a_document_computes_only_its_own_block():
    scenario = Scenario(config(min_replicas=1, max_replicas=1))
    run, _ = simulate([question(0.0, 1), question(100.0, 2)], "queued-context", scenario)
    cached = len(DOCUMENT) * BLOCK_TOKENS
    assert ttft_s(run.jobs[1]) == pytest.approx(HARDWARE.prefill_seconds(cached, cached + 100))


def test_a_replica_reports_queued_questions_on_one_document_net_of_their_shared_prefix():
    replica = SimReplica(0, HARDWARE, requested_s=0.0, ready_s=0.0, redis=None)
    replica.queue.extend([Job(0, question(0.0, 1)), Job(1, question(0.0, 2))])
    signal = replica.signal(now=0.0)
    assert signal.pending_prefill_tokens == 204_900 + 100  # the document once, both questions
    assert signal.longest_request_tokens == 204_900


def test_ongoing_requests_scaling_cuts_a_long_request_the_queued_context_policy_waits_for():
    # Two replicas; the long prompt lands on the newer one (the router's tie-break: fewer running
    # KV tokens, and the older one holds the chat's). One request in flight per replica asks for 1 replica
    # at target 2 (for the 2 s delay): Serve stops the newest, whose prefill outlasts the 60 s drain.
    scenario = Scenario(config(min_replicas=1, initial_replicas=2, downscale_delay_s=2.0, replica_startup_s=0.0))
    chat = TraceRequest(0.0, 1000, 3000, (9000,))  # decoding for 100 s: its replica holds KV
    trace = [chat, TraceRequest(0.5, 1_000_000, 10, ())]
    _, theirs = simulate(trace, "ongoing-requests", scenario, target_ongoing_requests=2.0)
    _, ours = simulate(trace, "queued-context", scenario)
    assert (theirs["cut_requests"], ours["cut_requests"]) == (1, 0)
    assert ours["slo_attainment"] == 1.0 and theirs["slo_attainment"] == 0.5


def test_when_no_target_reaches_our_attainment_the_best_one_is_the_reference():
    scenario = Scenario(config(min_replicas=1, initial_replicas=2, downscale_delay_s=2.0, replica_startup_s=0.0))
    trace = [TraceRequest(0.0, 1000, 3000, (9000,)), TraceRequest(0.5, 1_000_000, 10, ())]
    result = compare(trace, scenario, targets=(2.0, 4.0))  # both cut the long request: 0.5 each
    assert result["cheapest_matching"] is None and not result["reference_reaches_ours"]
    reference = result["reference"]
    assert (reference["slo_attainment"], reference["target_ongoing_requests"]) == (0.5, 2.0)  # equal attainment: the cheaper, then the first
    assert result["replica_seconds_ratio"] == result["queued_context"]["replica_seconds"] / reference["replica_seconds"]


def test_the_baseline_s_downscale_delay_can_be_swept_too():
    scenario = Scenario(config(min_replicas=1, initial_replicas=2, downscale_delay_s=2.0, replica_startup_s=0.0))
    trace = [TraceRequest(0.0, 1000, 3000, (9000,)), TraceRequest(0.5, 1_000_000, 10, ())]
    # Waiting 400 s, longer than the 1M-token prefill (244 s), ongoing-request scaling cuts nothing.
    result = compare(trace, scenario, targets=(2.0,), baseline_downscale_delays=(2.0, 400.0))
    assert [run["downscale_delay_s"] for run in result["ongoing_requests_sweep"]] == [2.0, 400.0]
    assert [run["slo_attainment"] for run in result["ongoing_requests_sweep"]] == [0.5, 1.0]
    assert result["reference_reaches_ours"] and result["reference"]["downscale_delay_s"] == 400.0


def test_same_trace_same_settings_same_result():
    trace = generate_trace(TraceShape(duration_s=900, seed=5))
    scenario = Scenario(config())
    assert simulate(trace, "queued-context", scenario)[1] == simulate(trace, "queued-context", scenario)[1]


def test_generated_traces_mix_short_turns_with_bursts_of_long_documents():
    trace = generate_trace(TraceShape(duration_s=3600, seed=1))
    lengths = [request.input_length for request in trace]
    assert min(lengths) >= 512 and max(lengths) <= 1_000_000 + BLOCK_TOKENS
    long = [request for request in trace if request.input_length >= 200_000]
    assert 5 <= len(long) <= 0.05 * len(trace)
    assert len({request.hash_ids[0] for request in long}) < len(long)  # several questions on a document
    assert trace == sorted(trace, key=lambda request: request.arrival_s)


def test_trace_files_round_trip_and_a_bad_line_is_named(tmp_path):
    trace = [TraceRequest(0.25, 700, 5, (1, 2)), TraceRequest(1.5, 2000, 9, (1, 3, 4, 5))]
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace)
    assert read_trace(path) == trace
    path.write_text(path.read_text() + '{"timestamp": 3, "input_length": "many"}\n')
    with pytest.raises(TraceError, match="trace.jsonl:3"):
        read_trace(path)


def test_cli_prints_one_json_object_with_the_contract_keys(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    assert main(["autoscale", "make-trace", str(path), "--duration-s", "600", "--seed", "2"]) == 0
    capsys.readouterr()
    plot = tmp_path / "plot.png"
    assert main(["autoscale", "simulate", "--trace", str(path), "--json", "--slo-ttft", "30", "--plot", str(plot)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"slo_attainment", "ttft_p50_s", "ttft_p99_s", "replica_seconds", "scale_events"} <= set(summary)
    assert summary["slo"] == "ttft <= 30 s" and 0 <= summary["slo_attainment"] <= 1
    assert plot.stat().st_size > 10_000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["autoscale", "simulate", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_queued_context_meets_the_slo_with_at_most_80_percent_of_the_replica_seconds():
    # One hour of the default generated trace (bench/autoscale.py runs twelve, and more scenarios).
    trace = generate_trace(TraceShape(seed=1))
    result = compare(trace, Scenario(config()))
    assert result["queued_context"]["slo_attainment"] >= 0.95
    assert result["reference_reaches_ours"] and result["reference"] is result["cheapest_matching"]
    assert result["replica_seconds_ratio"] <= 0.8


def test_a_fixed_ttft_bound_replaces_the_prompt_scaled_one():
    request = question(0.0, 1)
    assert SloRule(fixed_ttft_s=10.0).bound_s(request, HARDWARE) == 10.0
    assert SloRule().bound_s(request, HARDWARE) == pytest.approx(3.0 + 2 * HARDWARE.prefill_seconds(0, 204_900))
