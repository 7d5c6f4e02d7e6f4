"""What the engine did during one bench workload, from its `longctx_engine_` series (engine/
step_metrics.py) read before and after: steps by kind, their mean wall time, and how the engine
loop's wall time split between steps, publishing deltas, commands and waiting.

Read through /metrics for a served path (summed over replicas) and from the engine's own
exposition for the direct path, so the two are compared on the same counters: a served run that
took more or longer steps than direct lost its time inside the engine (arrivals spread over steps),
one with the same steps and more idle time lost it outside (HTTP, the streams, the client).
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

KINDS = ("prefill", "decode", "mixed")
# Step durations (engine/step_metrics.py STEP_DURATION_BUCKETS bounds, s) past which a step counts
# as slow: a mean over 20 mixed steps hides whether one took 100 ms (a first-time compile or
# plan, a collection) or all took a few ms more.
SLOW_STEP_BOUNDS_S = ("0.032", "0.128")
_DURATION_BUCKET = "longctx_engine_step_duration_seconds_bucket"
ACTIVITIES = ("step", "publish", "commands", "gather", "idle")
PHASES = ("schedule", "execute", "outputs")


def engine_counters(exposition: str) -> dict[tuple[str, str], float]:
    """{(sample name, its kind / phase / activity label): value} of the `longctx_engine_` counters,
    summed over replicas (the ingress labels each replica's series)."""
    counters: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = sample.labels
            if sample.name.startswith("longctx_engine_") and sample.name.endswith("_total"):
                label = labels.get("kind") or labels.get("phase") or labels.get("activity") or labels.get("generation", "")
                counters[(sample.name, label)] += sample.value
            elif sample.name == _DURATION_BUCKET and labels.get("le") in SLOW_STEP_BOUNDS_S:
                counters[(sample.name, labels["le"])] += sample.value  # steps at most that long
    return dict(counters)


def step_report(before: dict, after: dict, wall_s: float) -> dict:
    """The workload's share of the counters: `after - before`, over `wall_s` seconds of it."""

    def delta(name: str, label: str) -> float:
        key = (f"longctx_engine_{name}_total", label)
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = {kind: int(delta("steps", kind)) for kind in KINDS}
    at_most = {bound: after.get((_DURATION_BUCKET, bound), 0.0) - before.get((_DURATION_BUCKET, bound), 0.0)
               for bound in SLOW_STEP_BOUNDS_S}  # fmt: skip
    step_ms = {kind: round(delta("step_seconds", kind) / steps[kind] * 1e3, 3) if steps[kind] else 0.0 for kind in KINDS}
    loop = {activity: round(delta("loop_seconds", activity) / wall_s, 4) for activity in ACTIVITIES}
    phases_ms = {phase: round(delta("step_phase_seconds", phase) / max(1, sum(steps.values())) * 1e3, 3)
                 for phase in PHASES}  # fmt: skip
    gc = {generation: {"collections": int(delta("gc_collections", generation)),
                       "pause_ms": round(delta("gc_pause_seconds", generation) * 1e3, 3)} for generation in ("0", "1", "2")}
    return {
        "gc": gc,  # by generation ("2": full): the collections while the loop ran, every thread stopped
        "steps": steps,
        # Steps of any kind longer than each bound, keyed in ms ("32": steps over 32 ms).
        "steps_over_ms": {str(round(float(bound) * 1e3)): int(sum(steps.values()) - count)
                          for bound, count in at_most.items()},
        "mean_step_ms": step_ms,
        "mean_step_phase_ms": phases_ms,
        "prompt_tokens": int(delta("step_tokens", "prompt")),
        "output_tokens": int(delta("step_tokens", "output")),
        "loop_share_of_wall": loop,  # each activity's seconds over the workload's wall time
    }


def format_step_report(report: dict) -> str:
    steps, step_ms, loop = report["steps"], report["mean_step_ms"], report["loop_share_of_wall"]
    kinds = ", ".join(f"{steps[kind]} {kind} ({step_ms[kind]:.2f} ms)" for kind in KINDS if steps[kind])
    phases = " / ".join(f"{report['mean_step_phase_ms'][phase]:.2f}" for phase in PHASES)
    shares = ", ".join(f"{activity} {loop[activity]:.0%}" for activity in ACTIVITIES if loop[activity] >= 0.005)
    gc = report.get("gc", {})
    collections = sum(entry["collections"] for entry in gc.values())
    pauses = f"; gc: {collections} collections ({gc['2']['collections']} full), " \
             f"{sum(entry['pause_ms'] for entry in gc.values()):.1f} ms" if gc else ""
    over = report.get("steps_over_ms", {})
    slow = f", over {' / '.join(over)} ms: {' / '.join(str(n) for n in over.values())}" if any(over.values()) else ""
    return (f"engine: {sum(steps.values())} steps: {kinds}{slow}; schedule / execute / outputs {phases} ms a step; "
            f"loop: {shares}{pauses}")
