"""A serving loop's thread prepares itself to step when it starts (LLMEngine.warm_up_stepping_thread):
per-thread kernel plans (cuDNN's, model_shards/worker.py) are then not built inside its first request."""

from __future__ import annotations

import time

from engine.async_engine import AsyncEngine


def test_the_engine_thread_is_warmed_up_before_any_request(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    worker = engine.executor.worker
    served = AsyncEngine(engine)
    try:
        deadline = time.monotonic() + 10
        while served._thread.ident not in worker._warm_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served._thread.ident in worker._warm_threads  # no request was ever submitted
        assert not engine.scheduler.requests
    finally:
        served.shutdown()
