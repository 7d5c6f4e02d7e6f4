"""The autoscaler comparison of docs/autoscaling.md: queued-context scaling against Serve's
ongoing-requests scaling on generated bursty long-context traces, in the simulator (no GPU).

Run: `make bench-autoscale` (or `python bench/autoscale.py [--seeds 1 2 3] [--plot PNG]`). For
each scenario and trace seed it runs the queued-context policy, sweeps the ongoing-requests
target, and finds the cheapest target that reaches the same SLO attainment (none: the best
one, whose replica-seconds bound what the baseline would need from below); the goal is
attainment >= 95% with <= 80% of that target's replica-seconds. Prints the table, writes
bench/results/autoscale.json and the plot of the first seed of the first scenario.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from autoscaler.simulator.experiment import Scenario, compare, simulate
from autoscaler.simulator.plot import plot_runs
from autoscaler.simulator.trace_gen import TraceShape, generate_trace
from cluster.config import load_config

from report import print_table, write_json  # bench/ is on sys.path when a script runs

CONFIG = Path(__file__).resolve().parent / "autoscale.yaml"
GOAL_ATTAINMENT, GOAL_RATIO = 0.95, 0.8

# name -> (autoscaling overrides, trace shape changes): the default, then one change at a time.
SCENARIOS = {
    "default": ({}, {}),
    "start-up 60 s": ({"autoscaling.replica_startup_s": 60.0}, {}),
    "bursts within 60 s": ({}, {"burst_span_s": 60.0}),
    "min_replicas 1": ({"autoscaling.min_replicas": 1}, {}),
    # session 3's router: every prompt ranked by cost alone (no lanes), for the comparison
    "router without lanes": ({"serve.routing_long_prompt_tokens": 10**12}, {}),
}


def run_scenario(name: str, seed: int, baseline_delays: tuple[float, ...] = ()) -> tuple[dict, Scenario, list]:
    overrides, shape_changes = SCENARIOS[name]
    scenario = Scenario(load_config(CONFIG).with_overrides(overrides))
    trace = generate_trace(replace(TraceShape(seed=seed), **shape_changes))
    return compare(trace, scenario, baseline_downscale_delays=baseline_delays), scenario, trace


def table_row(name: str, seed: int, result: dict) -> dict:
    ours, reference, ratio = result["queued_context"], result["reference"], result["replica_seconds_ratio"]
    met = ours["slo_attainment"] >= GOAL_ATTAINMENT and ratio <= GOAL_RATIO
    target = f"{reference['target_ongoing_requests']:g} (down after {reference['downscale_delay_s']:g} s)"
    target += "" if result["reference_reaches_ours"] else ", best, below"
    return {
        "scenario": name, "seed": seed, "requests": ours["num_requests"],
        "queued-context SLO": f"{ours['slo_attainment']:.3f}",
        "its replica-s": round(ours["replica_seconds"]),
        "cheapest ongoing target": target,
        "its SLO": f"{reference['slo_attainment']:.3f}",
        "its replica-s ": round(reference["replica_seconds"]),
        "ratio": f"{ratio:.2f}",
        "goal": "met" if met else "missed",
    }


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per scenario: on how many seeds the goal held, and the spread of attainment and ratio."""
    summary = []
    for name in dict.fromkeys(row["scenario"] for row in rows):
        mine = [row for row in rows if row["scenario"] == name]
        ratios = [float(row["ratio"]) for row in mine]
        attainments = [float(row["queued-context SLO"]) for row in mine]
        summary.append({
            "scenario": name, "goal met": f"{sum(row['goal'] == 'met' for row in mine)}/{len(mine)}",
            "SLO min": f"{min(attainments):.3f}", "SLO median": f"{statistics.median(attainments):.3f}",
            "ratio median": f"{statistics.median(ratios):.2f}",
            "ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}",
        })
    return summary


def plot_first(scenario: Scenario, trace: list, result: dict, path: Path) -> None:
    ours, _ = simulate(trace, "queued-context", scenario)
    reference = result["reference"]
    target = reference["target_ongoing_requests"]
    delay = {"autoscaling.downscale_delay_s": reference["downscale_delay_s"]}
    theirs, _ = simulate(trace, "ongoing-requests", replace(scenario, config=scenario.config.with_overrides(delay)), target)
    plot_runs([("queued-context", ours), (f"ongoing-requests, target {target:g}", theirs)], path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 13)))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--baseline-delays", type=float, nargs="+", default=[], metavar="S",
                        help="also sweep the ongoing-requests policy's downscale delay (default: the policy's)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "results" / "autoscale.png")
    args = parser.parse_args()
    rows, results, started = [], {}, time.perf_counter()
    for name in args.scenarios:
        for seed in args.seeds:
            result, scenario, trace = run_scenario(name, seed, tuple(args.baseline_delays))
            rows.append(table_row(name, seed, result))
            results[f"{name}/seed {seed}"] = result
            if name == args.scenarios[0] and seed == args.seeds[0]:
                args.plot.parent.mkdir(parents=True, exist_ok=True)
                plot_first(scenario, trace, result, args.plot)
    print_table(f"queued-context vs ongoing-requests scaling ({time.perf_counter() - started:.0f} s)", rows)
    summary = summary_rows(rows)
    print_table("per scenario", summary)
    write_json("autoscale", {"summary": summary, "rows": rows, "runs": results})


if __name__ == "__main__":
    main()
