"""A discrete-event model of an autoscaled LLM deployment, to compare scaling policies on traces.

trace.py reads and writes the Mooncake trace format; trace_gen.py makes bursty long-context
traces; hardware.py prices prefill and decode on one replica; replica.py is one replica's queue,
prefix cache and KV; simulation.py routes, scales and advances time; results.py scores TTFT
against the SLO; cli.py is `longctx autoscale simulate | make-trace`.
"""
