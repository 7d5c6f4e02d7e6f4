"""The engine a replica serves from: the loop on a thread of the replica (`AsyncEngine`) or in a
child process (`ProcessEngine`), as `serve.engine_loop` says. Its own module so that neither
transport imports the other (engine_process.py builds on async_engine.py's caller side)."""

from __future__ import annotations

from cluster.config import LongctxConfig
from engine.async_engine import AsyncEngine, EngineClient
from engine.engine_process import ProcessEngine
from engine.llm_engine import LLMEngine
from executors import executor_backend
from executors.placement import uses_gpu


def serving_engine(config: LongctxConfig) -> EngineClient:
    """The engine a replica serves from, with the config's `serve` settings (stream pacing, arrival
    gathering, where the loop runs): the served replica and the bench's direct mode build it alike,
    so their rows compare the same engine (session 11's direct rows ran without the gap they were
    labelled with)."""
    settings = config.serve
    if engine_loop_of(config) == "process":
        return ProcessEngine(config)
    return AsyncEngine(LLMEngine(config), settings.stream_chunks_per_s, settings.arrival_gap_s,
                       settings.arrival_max_wait_s)


def engine_loop_of(config: LongctxConfig) -> str:
    """`serve.engine_loop` with auto resolved in this process: a child process where the engine
    drives a GPU (model.device cuda, or auto on a Ray cluster with GPUs) with local ranks (the loop's Python then no longer waits on the replica's GIL), a
    thread on a CPU (torch already uses every core; no second interpreter to start) or with Ray
    rank actors (the child would be no Ray worker)."""
    if config.serve.engine_loop != "auto":
        return config.serve.engine_loop
    return "process" if executor_backend(config) == "local" and uses_gpu(config) else "thread"
