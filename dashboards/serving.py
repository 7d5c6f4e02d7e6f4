"""The serving dashboard: traffic, latency percentiles, load against replicas, GPU memory.

Series: deployments/metrics.py (ingress: requests, tokens, latency histograms; replicas' engine
gauges labelled `replica`), engine/step_metrics.py (steps and the engine loop's time, labelled
`replica` by the ingress) and kvcache/tier_metrics.py (device KV bytes); GPU memory from Ray's
node metrics (`ray_node_gram_*`, MiB), which Ray exports on GPU nodes only.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models.dashboard import DynamicConfigValue

from dashboards.panels import FULL_WIDTH, Query, new_dashboard, percentile_queries, rate, stat_panel, timeseries_panel

UID = "longctx-serving"
MIB = 1024 * 1024
_ERRORS = 'status=~"4..|5.."'


def serving_dashboard() -> dashboard.Dashboard:
    rows = [("Traffic", _traffic_panels()), ("Latency", _latency_panels()), ("Load and replicas", _load_panels()),
            ("Engine steps", _engine_panels()), ("GPU memory", _memory_panels())]
    return new_dashboard(UID, "longctx / serving", "Requests, latency, queued context and replicas, engine steps, "
                         "GPU memory.", rows)


def _traffic_panels() -> list:
    return [
        timeseries_panel("Requests by status", "Finished HTTP requests per second, by endpoint and status code.",
                         "reqps", [Query(rate("longctx_requests_total", by="endpoint, status"), "{{endpoint}} {{status}}")],
                         width=10),
        stat_panel("Error ratio", "Share of requests answered 4xx or 5xx (429: admission queues full).",
                   "percentunit", [Query(f"(({rate('longctx_requests_total', selector=_ERRORS)}) or vector(0))"
                                         f" / {rate('longctx_requests_total')}", "errors")], width=4),
        timeseries_panel("Tokens", "Prompt tokens served, of which from the prefix cache, and generated tokens.",
                         "short", [Query(rate("longctx_prompt_tokens_total"), "prompt"),
                                   Query(rate("longctx_prefix_cache_hit_tokens_total"), "prompt, cached"),
                                   Query(rate("longctx_generation_tokens_total"), "generated")], width=10),
    ]


def _latency_panels() -> list:
    width = FULL_WIDTH // 3
    return [
        timeseries_panel("Time to first token", "Arrival to first token, queueing and the whole prefill included "
                         "(buckets up to 2 h: a 1M-token prefill takes minutes).", "s",
                         percentile_queries("longctx_time_to_first_token_seconds"), width),
        timeseries_panel("Time per output token", "Between consecutive tokens of a sequence.", "s",
                         percentile_queries("longctx_inter_token_latency_seconds"), width),
        timeseries_panel("End-to-end latency", "Arrival to last token.", "s",
                         percentile_queries("longctx_request_duration_seconds"), width),
    ]


def _load_panels() -> list:
    return [
        timeseries_panel("Queued context tokens and replicas", "Prompt tokens not yet computed (scheduler) and "
                         "admitted but not streaming (admission queue), summed over replicas, beside the replica "
                         "count (right axis): what replica autoscaling by context length acts on.", "short",
                         [Query("sum(longctx_queued_tokens)", "queued prefill tokens"),
                          Query("sum(longctx_admission_queued_tokens)", "admission-queued tokens"),
                          Query("count(longctx_kv_blocks_capacity)", "replicas")])
        .override_by_query("C", [DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                                 DynamicConfigValue(id_val="decimals", value=0)]),
        timeseries_panel("Sequences per replica", "Running and waiting sequences of each LLM server replica.",
                         "short", [Query("longctx_requests_running", "running {{replica}}"),
                                   Query("longctx_requests_waiting", "waiting {{replica}}")]),
    ]


def _engine_panels() -> list:
    """What each replica's engine spends its time on (engine/step_metrics.py): mixed steps, a
    prompt's chunk beside decoding requests, are where their time per output token goes; a loop
    that idles while requests wait points at the HTTP side; garbage collections stop every thread
    of their process (engine/gc_pauses.py)."""
    width = FULL_WIDTH // 4
    step_seconds = rate("longctx_engine_step_seconds_total", by="replica, kind")
    steps = rate("longctx_engine_steps_total", by="replica, kind")
    return [
        timeseries_panel("Engine steps by kind", "Steps per second of each replica's engine: prefill (prompts "
                         "only), decode (one token per running request), mixed (a prompt's chunk beside decoding "
                         "requests, whose next token waits for it).", "short",
                         [Query(steps, "{{kind}} {{replica}}")], width),
        timeseries_panel("Mean step time by kind", "Wall time of an engine step, by kind.", "s",
                         [Query(f"{step_seconds} / {steps}", "{{kind}} {{replica}}")], width),
        timeseries_panel("Engine loop time", "Share of each replica's engine loop spent stepping (a step's "
                         "deltas are handed to the streams within it), publishing stats, running commands (adding "
                         "requests), gathering a burst, or idle.", "percentunit",
                         [Query(rate("longctx_engine_loop_seconds_total", by="replica, activity"),
                                "{{activity}} {{replica}}")], width),
        timeseries_panel("Garbage collection pauses", "Share of wall time each replica's processes spent stopped "
                         "for Python's garbage collector: the engine's process (while its loop runs) and the "
                         "replica's own (HTTP, streams), by generation (2: full).", "percentunit",
                         [Query(rate("longctx_engine_gc_pause_seconds_total", by="replica, generation"),
                                "engine gen {{generation}} {{replica}}"),
                          Query(rate("longctx_replica_gc_pause_seconds_total", by="replica, generation"),
                                "replica gen {{generation}} {{replica}}")], width),
    ]


def _memory_panels() -> list:
    return [
        timeseries_panel("Device KV cache in use", "Share of device KV blocks not free, per replica.", "percentunit",
                         [Query("1 - longctx_kv_blocks_free / longctx_kv_blocks_capacity", "{{replica}}")]),
        timeseries_panel("GPU memory", "Device KV bytes holding cached blocks (longctx), and GPU memory used and "
                         "total per node (Ray's node metrics, GPU nodes only).", "bytes",
                         [Query('sum by (replica) (longctx_kv_tier_bytes{tier="device"})', "KV cached {{replica}}"),
                          Query(f"sum by (instance) (ray_node_gram_used) * {MIB}", "used {{instance}}"),
                          Query(f"sum by (instance) (ray_node_gram_used + ray_node_gram_available) * {MIB}",
                                "total {{instance}}")]),
    ]
