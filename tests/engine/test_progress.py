"""Long prefills say how far they are: the engine's log every interval (tokens done, rate, time
left, then done), and `longctx generate`'s progress line on stderr; short ones stay quiet."""

from __future__ import annotations

import io
import logging

from cluster.progress_line import ProgressLine
from engine.offline import generate
from engine.progress import PrefillProgressLog
from protocol.sampling_params import SamplingParams

from .test_engine_vs_hf import random_prompt


class TickingClock:
    """One second per reading: time advances with the engine's steps, not the wall clock."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_long_prefill_is_logged_with_rate_and_time_left(tiny_model_dir, make_engine_for, caplog):
    engine = make_engine_for(tiny_model_dir, budget=64, block_size=16)
    engine.prefill_progress = PrefillProgressLog(interval_s=3.0, clock=TickingClock())
    with caplog.at_level(logging.INFO, logger="engine.progress"):
        generate(engine, [random_prompt(3, 1000)], SamplingParams(max_tokens=2))
    lines = [record.getMessage() for record in caplog.records]
    under_way = [line for line in lines if "/ 1,000 tokens" in line]
    assert len(under_way) >= 3 and "tokens/s, about" in under_way[0] and "left" in under_way[0]
    # 16 steps of 64 tokens, 1 s each, timed from the end of the first
    assert lines[-1].endswith("prefill of 1,000 tokens done in 15 s")


def test_a_short_prefill_logs_nothing(tiny_model_dir, make_engine_for, caplog):
    engine = make_engine_for(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="engine.progress"):
        generate(engine, [random_prompt(4, 100)], SamplingParams(max_tokens=2))
    assert not [record for record in caplog.records if record.name == "engine.progress"]


def test_generate_s_progress_line(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir, budget=64, block_size=16)
    stream = io.StringIO()  # not a terminal: a line every PIPE_INTERVAL_S
    line = ProgressLine(stream, clock=TickingClock())
    generate(engine, [random_prompt(5, 1000)], SamplingParams(max_tokens=2), on_progress=line)
    printed = stream.getvalue().splitlines()
    assert printed and all(text.startswith("longctx: prefill ") and "/ 1,000 tokens" in text for text in printed)
