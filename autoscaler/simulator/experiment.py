"""One simulated run from a config, and the comparison the issue asks for: the queued-context
policy against the cheapest ongoing-requests target that reaches the same SLO attainment (or,
when none does, the best-attaining target)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from autoscaler.lanes import LaneRule
from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.results import SloRule, summarize
from autoscaler.simulator.scalers import make_scaler
from autoscaler.simulator.simulation import Simulation, SimulationRun, SimulationSettings
from autoscaler.simulator.trace import TraceRequest
from cluster.config import LongctxConfig

# Serve's default target is 2; a sweep from 1 (a replica per two requests in flight) to 16.
ONGOING_TARGETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@dataclass(frozen=True)
class Scenario:
    """Everything a run depends on besides the trace and the policy."""

    config: LongctxConfig  # autoscaling.*, serve.drain_timeout_s
    hardware: ReplicaHardware = ReplicaHardware()
    slo: SloRule = SloRule()

    def simulation_settings(self) -> SimulationSettings:
        settings = self.config.autoscaling
        initial = settings.initial_replicas if settings.initial_replicas is not None else settings.min_replicas
        serve = self.config.serve
        lanes = LaneRule(serve.routing_long_prompt_tokens, serve.routing_short_lanes)
        return SimulationSettings(settings.metrics_push_interval_s, serve.drain_timeout_s,
                                  settings.replica_startup_s, initial, lanes)


def simulate(trace: list[TraceRequest], policy: str, scenario: Scenario,
             target_ongoing_requests: float = 2.0) -> tuple[SimulationRun, dict[str, Any]]:
    scaler = make_scaler(policy, scenario.config.autoscaling, target_ongoing_requests)
    run = Simulation(trace, scaler, scenario.hardware, scenario.simulation_settings()).simulate()
    summary = summarize(run, policy, scenario.slo, scenario.hardware)
    if policy == "ongoing-requests":
        summary["target_ongoing_requests"] = target_ongoing_requests
        summary["downscale_delay_s"] = scenario.config.autoscaling.effective_downscale_delay_s
    return run, summary


def compare(trace: list[TraceRequest], scenario: Scenario, targets=ONGOING_TARGETS,
            baseline_downscale_delays: tuple[float, ...] = ()) -> dict[str, Any]:
    """Queued-context, the ongoing-requests sweep, and the run it is measured against: the cheapest
    target at least as good, or, when no target gets there, the best one (the baseline needs at
    least its replica-seconds for our attainment, so the ratio is then an upper bound).
    `baseline_downscale_delays`: sweep the baseline's downscale delay too (default: the policy's)."""
    _, ours = simulate(trace, "queued-context", scenario)
    sweep = [run for baseline in _baselines(scenario, baseline_downscale_delays)
             for run in (simulate(trace, "ongoing-requests", baseline, target)[1] for target in targets)]
    matching = [run for run in sweep if run["slo_attainment"] >= ours["slo_attainment"]]
    cheapest = min(matching, key=lambda run: run["replica_seconds"], default=None)
    reference = cheapest or max(sweep, key=lambda run: (run["slo_attainment"], -run["replica_seconds"]))
    return {"queued_context": ours, "ongoing_requests_sweep": sweep, "cheapest_matching": cheapest,
            "reference": reference, "reference_reaches_ours": cheapest is not None,
            "replica_seconds_ratio": ours["replica_seconds"] / reference["replica_seconds"]}


def _baselines(scenario: Scenario, downscale_delays: tuple[float, ...]) -> list[Scenario]:
    if not downscale_delays:
        return [scenario]
    return [replace(scenario, config=scenario.config.with_overrides({"autoscaling.downscale_delay_s": delay}))
            for delay in downscale_delays]
