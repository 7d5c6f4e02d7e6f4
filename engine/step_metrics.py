"""Prometheus series of the engine's steps and of the loop that drives them: `longctx_engine_`
prefix, base units, in the engine's own registry (the KV tiers' one: /metrics exports both).

They answer what an operator (and the serve benches) ask when served throughput falls short of
the engine's: did the engine take more or longer steps (requests arriving apart split a burst's
prefill over steps that also decode), or did it wait (between steps: delivering deltas, running
commands; idle: nothing to do)? Kinds of step:

    prefill  only prompt tokens (a burst admitted together)
    decode   only one new token per running request (the CUDA-graph path)
    mixed    both: a prompt's chunk beside decoding requests (their TPOT pays for the chunk)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

STEP_KINDS = ("prefill", "decode", "mixed")
# Where a step's wall time goes: choosing the batch, the executor's forward and sample, and
# turning sampled tokens into deltas (stop checks, detokenizing). With scheduler.overlap_outputs
# (the default) "outputs" holds the checks without text; the text and its delivery run inside the
# next step's "execute", while the device computes (engine/overlapped_work.py).
STEP_PHASES = ("schedule", "execute", "outputs")
# Where the loop's wall time goes: steps (their deltas handed to the streams within them);
# publishing (the stats snapshot, in a child process the turn's message when no step sent one);
# running callers' commands (add_request tokenizes and checks a prompt); gathering a burst's
# arrivals (serve.arrival_gap_s); and blocking for a command with no work.
LOOP_ACTIVITIES = ("step", "publish", "commands", "gather", "idle")
GC_GENERATIONS = ("0", "1", "2")
STEP_DURATION_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 4.0, 8.0)


def step_kind(num_prompt_tokens: int, num_output_tokens: int) -> str:
    """The kind of a step that computed these tokens (at least one of them)."""
    if num_prompt_tokens and num_output_tokens:
        return "mixed"
    return "prefill" if num_prompt_tokens else "decode"


class StepMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.steps = Counter("longctx_engine_steps", "Engine steps, by kind (prefill, decode, mixed).", ["kind"],
                             registry=registry)  # fmt: skip
        self.step_seconds = Counter("longctx_engine_step_seconds", "Wall time of engine steps, by kind.", ["kind"],
                                    registry=registry)  # fmt: skip
        self.phase_seconds = Counter("longctx_engine_step_phase_seconds", "Wall time of engine steps, by phase "
                                     "(schedule, execute, outputs).", ["phase"], registry=registry)  # fmt: skip
        self.step_duration = Histogram("longctx_engine_step_duration_seconds", "Wall time of one engine step.",
                                       buckets=STEP_DURATION_BUCKETS, registry=registry)  # fmt: skip
        self.tokens = Counter("longctx_engine_step_tokens", "Tokens computed by engine steps, by phase of their "
                              "request (prompt, output).", ["phase"], registry=registry)  # fmt: skip
        self.loop_seconds = Counter("longctx_engine_loop_seconds", "Wall time of the engine loop, by activity "
                                    "(step, publish, commands, gather, idle).", ["activity"], registry=registry)  # fmt: skip
        # Garbage collections while the loop runs (engine/gc_pauses.py): every thread stops for them.
        self.gc_collections = Counter("longctx_engine_gc_collections", "Garbage collections of the engine's "
                                      "process while its loop runs, by generation (2: full).", ["generation"],
                                      registry=registry)  # fmt: skip
        self.gc_pause_seconds = Counter("longctx_engine_gc_pause_seconds", "Wall time of those garbage "
                                        "collections (every thread of the process stops), by generation.",
                                        ["generation"], registry=registry)  # fmt: skip
        for generation in GC_GENERATIONS:
            self.gc_collections.labels(generation)
            self.gc_pause_seconds.labels(generation)
        for kind in STEP_KINDS:  # every series exported from the start: rates need a zero to start from
            self.steps.labels(kind)
            self.step_seconds.labels(kind)
        for phase in STEP_PHASES:
            self.phase_seconds.labels(phase)
        for phase in ("prompt", "output"):
            self.tokens.labels(phase)
        for activity in LOOP_ACTIVITIES:
            self.loop_seconds.labels(activity)

    def observe_step(self, num_prompt_tokens: int, num_output_tokens: int, phase_seconds: dict[str, float]) -> None:
        """One step that computed these tokens; `phase_seconds`: STEP_PHASES -> seconds."""
        kind = step_kind(num_prompt_tokens, num_output_tokens)
        seconds = sum(phase_seconds.values())
        self.steps.labels(kind).inc()
        self.step_seconds.labels(kind).inc(seconds)
        self.step_duration.observe(seconds)
        self.tokens.labels("prompt").inc(num_prompt_tokens)
        self.tokens.labels("output").inc(num_output_tokens)
        for phase, phase_s in phase_seconds.items():
            self.phase_seconds.labels(phase).inc(phase_s)

    def observe_loop(self, activity: str, seconds: float) -> None:
        self.loop_seconds.labels(activity).inc(seconds)

    def observe_gc(self, generation: int, seconds: float) -> None:
        self.gc_collections.labels(str(generation)).inc()
        self.gc_pause_seconds.labels(str(generation)).inc(seconds)
