"""`longctx autoscale simulate | make-trace`.

Contract: `simulate --json` prints one JSON object with at least `slo_attainment`,
`ttft_p50_s`, `ttft_p99_s`, `replica_seconds` and `scale_events` (a count). The policy's
parameters are the config's `autoscaling` section (`--config`, as for `longctx serve`); the
drain timeout is its serve.drain_timeout_s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from pydantic import ValidationError

from autoscaler.simulator.experiment import Scenario, simulate
from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.results import SloRule
from autoscaler.simulator.scalers import POLICIES
from autoscaler.simulator.trace import read_trace, write_trace
from autoscaler.simulator.trace_gen import TraceShape, generate_trace
from cluster.config import load_config


def add_autoscale_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="autoscale_command", required=True)
    simulate_parser = actions.add_parser("simulate", help="replay a Mooncake trace against a scaling policy")
    simulate_parser.add_argument("--trace", required=True, help="JSON lines: timestamp (ms), input_length, "
                                 "output_length, hash_ids")
    simulate_parser.add_argument("--policy", choices=POLICIES, default="queued-context")
    simulate_parser.add_argument("--slo-ttft", type=float, metavar="S", help="one TTFT bound for every request; "
                                 f"default: {SloRule().describe()}")
    simulate_parser.add_argument("--plot", metavar="OUT.png", help="replicas and queued tokens over time")
    simulate_parser.add_argument("--json", action="store_true", help="print one JSON object")
    simulate_parser.add_argument("--config", help="longctx YAML config: its autoscaling section is the policy's")
    simulate_parser.add_argument("--target-ongoing-requests", type=float, default=2.0,
                                 help="the ongoing-requests policy's target per replica (Serve's default: 2)")
    for name, field in ReplicaHardware.model_fields.items():
        simulate_parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                                     help=f"{field.description} (default {field.default})")
    simulate_parser.add_argument("--no-redis", action="store_true", help="no shared Redis KV tier")
    make_trace = actions.add_parser("make-trace", help="write a bursty long-context trace (Mooncake format)")
    make_trace.add_argument("out", help="output file (JSON lines)")
    for field in fields(TraceShape):
        if field.type in ("float", "int"):
            make_trace.add_argument(f"--{field.name.replace('_', '-')}", type=float if field.type == "float" else int,
                                    default=field.default, help=f"default {field.default}")


def run_autoscale(args: argparse.Namespace) -> int:
    if args.autoscale_command == "make-trace":
        shape = TraceShape(**{f.name: getattr(args, f.name) for f in fields(TraceShape) if hasattr(args, f.name)})
        requests = generate_trace(shape)
        write_trace(args.out, requests)
        print(f"longctx: wrote {len(requests)} requests to {args.out}")
        return 0
    return _run_simulate(args)


def _run_simulate(args: argparse.Namespace) -> int:
    scenario = Scenario(load_config(args.config), _hardware(args), SloRule(fixed_ttft_s=args.slo_ttft))
    run, summary = simulate(read_trace(args.trace), args.policy, scenario, args.target_ongoing_requests)
    if args.plot:
        from autoscaler.simulator.plot import plot_runs

        plot_runs([(args.policy, run)], args.plot)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def _hardware(args: argparse.Namespace) -> ReplicaHardware:
    given = {name: getattr(args, name) for name in ReplicaHardware.model_fields if getattr(args, name) is not None}
    if args.no_redis:
        given["redis_restore_tokens_per_s"] = None
    try:
        return ReplicaHardware(**given)
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
