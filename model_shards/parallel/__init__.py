"""Splitting the model across ranks: process groups, tensor parallelism, sequence parallelism.

See docs/parallelism.md for the layout of ranks, the KV cache under sequence parallelism and the
executors that host the ranks.
"""
