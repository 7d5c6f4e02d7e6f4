"""TritonCompileLog against Triton's hook protocol (knobs.runtime.jit_cache_hook before a compile,
jit_post_compile_hook after, keyword arguments as JITFunction._call_hook passes them). A CPU has no
compiler backend, so the test calls the installed hooks as Triton does."""

import time

from model_shards.attention.triton_runtime import triton
from model_shards.triton_compiles import TritonCompileLog, summarize


class FunctionInfo:  # what Triton passes as fn: JitFunctionInfo(module, name, jit_function)
    def __init__(self, name):
        self.name = name


def compile_through_hooks(name: str, specialization: str, seconds: float) -> bool | None:
    runtime = triton.knobs.runtime
    skip = runtime.jit_cache_hook(key=(), repr=specialization, fn=FunctionInfo(name), compile={},
                                  is_manual_warmup=False, already_compiled=False)
    time.sleep(seconds)
    runtime.jit_post_compile_hook(key=(), repr=specialization, fn=FunctionInfo(name), compile={},
                                  is_manual_warmup=False, already_compiled=False)
    return skip


def test_records_each_compile_with_its_time_and_takes_them_once():
    with TritonCompileLog() as log:
        assert log.available
        assert compile_through_hooks("_sink_softmax", "_sink_softmax[num_warps=8](BK: constexpr=2048)", 0.02) is None
        compile_through_hooks("_index_scores", "_index_scores[num_warps=4](entries: i32D)", 0.0)
        first = log.take()
        assert [c.kernel for c in first] == ["_sink_softmax", "_index_scores"]
        assert first[0].seconds >= 0.02 and first[1].seconds < first[0].seconds
        assert first[1].specialization.endswith("(entries: i32D)")
        assert log.take() == []
    assert summarize(first)["triton_compiles"] == 2
    assert summarize(first)["triton_compiled"] == ["_sink_softmax", "_index_scores"]


def test_hooks_installed_before_keep_being_called_and_come_back():
    runtime = triton.knobs.runtime
    seen = []
    previous_before = lambda **kwargs: seen.append(("before", kwargs["repr"])) or True  # noqa: E731
    previous_after = lambda **kwargs: seen.append(("after", kwargs["repr"]))  # noqa: E731
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = previous_before, previous_after
    try:
        with TritonCompileLog() as log:
            assert compile_through_hooks("k", "k[]()", 0.0) is True  # the earlier hook's skip answer kept
        assert seen == [("before", "k[]()"), ("after", "k[]()")] and len(log.compiles) == 1
        assert runtime.jit_cache_hook is previous_before and runtime.jit_post_compile_hook is previous_after
    finally:
        runtime.jit_cache_hook = runtime.jit_post_compile_hook = None
