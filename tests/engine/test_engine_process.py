"""The engine loop in a child process (`serve.engine_loop: process`) serves as the thread does:
the same greedy tokens and text, a bad request's InvalidParameterError in the caller, aborts that
free their requests, and a child that dies fails its open streams at once instead of hanging.

Spawning a child that imports torch costs seconds: one engine serves the module's tests, and only
the tests that end a child (killing it, shutting it down) start their own."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from cluster.config import (
    CacheSettings,
    LongctxConfig,
    ModelSettings,
    ParallelSettings,
    SchedulerSettings,
    ServeSettings,
)
from engine.async_engine import AsyncEngine
from engine.serving import serving_engine
from engine.engine_loop import EngineDeadError
from engine.engine_process import ProcessEngine
from engine.llm_engine import LLMEngine
from protocol.sampling_params import InvalidParameterError, SamplingParams

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPTS = ["The engine runs in a child", "process, away from the", "HTTP server's GIL"]
TIMEOUT_S = 30  # any wait here ends long before this unless something hangs


def _config(model_dir: str, engine_loop: str = "process") -> LongctxConfig:
    return LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=4, num_device_blocks=128),
        scheduler=SchedulerSettings(max_tokens_per_step=2048),
        serve=ServeSettings(engine_loop=engine_loop, stream_chunks_per_s=0),
    )


@pytest.fixture(scope="module")
def process_engine(tiny_model_dir):
    engine = serving_engine(_config(tiny_model_dir))
    yield engine
    engine.shutdown()


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


async def _outputs(engine, prompts, params=GREEDY) -> list[tuple[list[int], str]]:
    async def one(index, prompt):
        deltas = [delta async for delta in engine.generate(f"r{index}-{time.monotonic_ns()}", prompt, params)]
        return [token for delta in deltas for token in delta.token_ids], "".join(delta.text for delta in deltas)

    return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(prompts)))


async def _until_idle(engine) -> None:
    while engine.stats().num_running or engine.stats().num_waiting:
        await asyncio.sleep(0.01)


def test_serving_engine_picks_the_process_transport(process_engine):
    assert isinstance(process_engine, ProcessEngine) and process_engine.is_alive
    assert process_engine.max_model_len > 0


def test_greedy_output_through_the_process_equals_the_thread_s(process_engine, tiny_model_dir):
    thread_engine = AsyncEngine(LLMEngine(_config(tiny_model_dir, "thread")))
    try:
        expected = _run(_outputs(thread_engine, PROMPTS))
    finally:
        thread_engine.shutdown()
    got = _run(_outputs(process_engine, PROMPTS))
    assert got == expected
    assert all(len(tokens) == GREEDY.max_tokens for tokens, _ in got)


def test_a_bad_request_raises_invalid_parameter_error_naming_its_param(process_engine):
    async def first(prompt, params):
        return [delta async for delta in process_engine.generate(f"bad-{time.monotonic_ns()}", prompt, params)]

    with pytest.raises(InvalidParameterError) as out_of_vocabulary:
        _run(first([1, 2, 10**9], GREEDY))
    assert out_of_vocabulary.value.param == "prompt"
    with pytest.raises(InvalidParameterError) as too_long:
        _run(first("Hello", SamplingParams(max_tokens=10**6)))
    assert too_long.value.param == "prompt" and too_long.value.code == "context_length_exceeded"
    assert process_engine.is_alive


def test_the_replica_prepares_requests_and_the_child_only_adds_them(process_engine, monkeypatch):
    """The caller's thread tokenizes, checks and hashes (engine/request_preparer.py), so the
    child's GIL stays with its step; the child gets `add_prepared` and serves the same tokens."""
    threads, sent = [], []
    prepare, send = process_engine._preparer.prepare, process_engine._commands.send

    def recording_prepare(*args):
        threads.append(threading.current_thread().name)
        return prepare(*args)

    def recording_send(message):
        sent.append(message[0])
        return send(message)

    monkeypatch.setattr(process_engine._preparer, "prepare", recording_prepare)
    monkeypatch.setattr(process_engine._commands, "send", recording_send, raising=False)
    tokens = _run(_outputs(process_engine, PROMPTS[:1]))[0][0]
    # Counted, not first: the module's engine is shared, and an earlier test's stream closed at
    # garbage collection sends its "drop" whenever that runs (the likely cause of one failure in session 19).
    assert threads == [threading.current_thread().name] and sent.count("add_prepared") == 1
    assert "add_request" not in sent and len(tokens) == GREEDY.max_tokens


def test_closing_a_stream_early_aborts_and_frees_its_request(process_engine):
    async def leave_after_first_list():
        long_run = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = process_engine.stream("leaves", "A client that goes away", long_run)
        first = await anext(stream)
        await stream.aclose()
        await _until_idle(process_engine)
        return first

    assert len(_run(leave_after_first_list())) >= 1
    stats = process_engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks  # the prefix cache keeps only free blocks


def test_set_arrival_gap_reaches_the_child_and_requests_still_flow(process_engine):
    with pytest.raises(ValueError):
        process_engine.set_arrival_gap(-1.0)
    process_engine.set_arrival_gap(0.002)
    try:
        assert process_engine.arrival_gap_s == 0.002
        assert len(_run(_outputs(process_engine, PROMPTS[:2]))) == 2
    finally:
        process_engine.set_arrival_gap(0.0)
    assert process_engine.arrival_gap_s == 0.0


def test_summary_metrics_and_idle_health(process_engine):
    assert process_engine.summary().lines()
    exposition = _run(process_engine.metrics_exposition())
    assert "longctx_kv" in exposition
    assert process_engine.seconds_since_last_step() == 0.0


def test_a_killed_child_fails_open_streams_and_is_no_longer_alive(tiny_model_dir):
    engine = ProcessEngine(_config(tiny_model_dir))
    try:
        async def stream_then_kill():
            stream = engine.stream("doomed", "Killed mid-stream", SamplingParams(max_tokens=200, ignore_eos=True))
            await anext(stream)
            os.kill(engine.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass

        _run(stream_then_kill())
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            _run(_outputs(engine, PROMPTS[:1]))
    finally:
        engine.shutdown()


def test_shutdown_leaves_no_child_process(tiny_model_dir):
    engine = ProcessEngine(_config(tiny_model_dir))
    pid = engine.pid
    engine.shutdown()
    assert not engine.is_alive and engine._process.exitcode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no such process


def test_process_mode_with_ray_ranks_is_refused_at_config_time(tiny_model_dir):
    with pytest.raises(ValueError, match="engine_loop process"):
        LongctxConfig(model=ModelSettings(path=tiny_model_dir), parallel=ParallelSettings(executor="ray"),
                      serve=ServeSettings(engine_loop="process"))


def test_num_open_requests_counts_callers_requests_until_they_finish_or_abort(tiny_engine):
    tiny_engine.add_request("open-n2", "Two sequences", SamplingParams(max_tokens=2, n=2, ignore_eos=True))
    tiny_engine.add_request("open-aborted", "Aborted", SamplingParams(max_tokens=50, ignore_eos=True))
    assert tiny_engine.num_open_requests() == 2  # a request of n sequences counts once
    tiny_engine.abort_request("open-aborted")
    assert tiny_engine.num_open_requests() == 1
    while tiny_engine.has_unfinished_requests():
        tiny_engine.step()
    assert tiny_engine.num_open_requests() == 0


def test_an_llm_server_serves_through_the_process_engine(tiny_model_dir):
    from deployments.llm_server import LLMServer
    from deployments.local_backend import LocalBackend

    server = LLMServer(_config(tiny_model_dir))
    try:
        assert isinstance(server.engine, ProcessEngine)
        assert server.summary_lines()
        [snapshot] = _run(LocalBackend(server).replica_metrics(timeout_s=5))
        assert snapshot["alive"] is True and "longctx_kv" in snapshot["exposition"]
        server.check_health()
    finally:
        server.engine.shutdown()
    assert not server.engine.is_alive


def test_a_stream_cancelled_while_its_request_is_added_leaves_the_engine_serving(process_engine):
    async def cancel_then_serve():
        stream = process_engine.stream("cancelled", "Cancelled at once", SamplingParams(max_tokens=50, ignore_eos=True))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the add_request command is on its way
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        await _until_idle(process_engine)
        return await _outputs(process_engine, PROMPTS[:1])

    [(tokens, _)] = _run(cancel_then_serve())
    assert len(tokens) == GREEDY.max_tokens and process_engine.is_alive


def test_an_id_reused_right_after_its_stream_closed_gets_its_own_output_only(process_engine):
    async def close_then_reuse():
        stream = process_engine.stream("reused", "Closed early", SamplingParams(max_tokens=100, ignore_eos=True))
        await anext(stream)
        await stream.aclose()  # the request is dropped in the child, behind the next add_request
        return [delta async for delta in process_engine.generate("reused", PROMPTS[0], GREEDY)]

    deltas = _run(close_then_reuse())
    assert sum(len(delta.token_ids) for delta in deltas) == GREEDY.max_tokens
    assert [delta.finish_reason for delta in deltas if delta.finished] == ["length"]


def test_a_child_that_fails_to_build_its_engine_raises_in_the_parent(tmp_path):
    with pytest.raises(EngineDeadError, match="failed to start"):
        ProcessEngine(_config(str(tmp_path)))  # an empty folder: no model to load


def test_the_child_mirrors_the_parent_s_log_handlers_for_the_engine_s_packages():
    """A replica logs longctx's packages to stderr at INFO (deployments/llm_server.py); a spawned
    child starts with bare loggers, so it is told which to set up alike, and only those."""
    import logging

    from engine.engine_process import _log_levels_to_mirror

    engine_logger = logging.getLogger("engine")
    handler, level = logging.StreamHandler(), engine_logger.level
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.INFO)
    try:
        mirrored = _log_levels_to_mirror()
    finally:
        engine_logger.removeHandler(handler)
        engine_logger.setLevel(level)
    assert mirrored.get("engine") == logging.INFO
    assert all(logging.getLogger(name).handlers for name in mirrored if name != "engine")


def test_an_unknown_command_is_answered_with_an_error_and_the_engine_serves_on(process_engine):
    with pytest.raises(ValueError, match="unknown engine command"):
        _run(process_engine._call("no_such_command"))
    assert len(_run(_outputs(process_engine, PROMPTS[:1]))) == 1 and process_engine.is_alive


def test_auto_runs_the_loop_in_a_child_on_a_gpu_with_local_ranks_only(tiny_model_dir):
    from engine import serving

    auto = _config(tiny_model_dir, engine_loop="auto")
    assert serving.engine_loop_of(auto) == "thread"  # model.device cpu
    assert serving.engine_loop_of(_config(tiny_model_dir, engine_loop="process")) == "process"
    auto = auto.with_overrides({"model.device": "cuda"})
    assert serving.engine_loop_of(auto) == "process"
    with_ray_ranks = auto.with_overrides({"parallel.executor": "ray", "parallel.tensor_parallel_size": 2})
    assert serving.engine_loop_of(with_ray_ranks) == "thread"  # the child could place no rank actors
    assert serving.engine_loop_of(auto.with_overrides({"serve.engine_loop": "thread"})) == "thread"


def test_the_engine_process_sets_its_switch_interval_from_the_config(tmp_path):
    """run_engine_process (the child's entry, run here on an empty folder, so the engine fails to
    build right after) sets the interpreter's GIL switch interval before anything else starts."""
    import multiprocessing
    import sys

    from engine.engine_process import run_engine_process

    commands, _ = multiprocessing.Pipe(duplex=False)
    events_in, events_out = multiprocessing.Pipe(duplex=False)
    config = LongctxConfig(model=ModelSettings(path=str(tmp_path), device="cpu"),
                           serve=ServeSettings(engine_switch_interval_s=0.0007))
    before = sys.getswitchinterval()
    try:
        with pytest.raises(Exception):
            run_engine_process(config, commands, events_out, {})
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        assert events_in.recv()[0] == "dead"
    finally:
        sys.setswitchinterval(before)
    assert ServeSettings().engine_switch_interval_s == 0.0005 < before
