"""Which Triton kernels compile, when, and for how long: a JIT compile inside a request's step is
a latency spike of 0.1-1 s of host time while the GPU waits.

Triton compiles a kernel again for every new specialization of its arguments: each new value of a
`tl.constexpr` (a block size from `next_power_of_2` of a length), each integer argument that
starts or stops being 1 or a multiple of 16, a pointer that starts or stops being 16-byte
aligned, an integer that no longer fits int32. Lengths that grow with the context (entries, keys,
query blocks) can therefore compile new variants late in a long prompt. This module records them
through Triton's own hooks (`triton.knobs.runtime.jit_cache_hook`, called before a compile, and
`jit_post_compile_hook`, after), so a bench can put the compiles of each chunk beside its time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class TritonCompile:
    kernel: str  # the @triton.jit function's name
    seconds: float  # host time from the cache miss to the compiled kernel
    specialization: str  # Triton's description: the options and each argument's type / specialization


class TritonCompileLog:
    """Records every Triton compile while entered; `take()` returns those since the last take.

    Hooks already installed (another tool's) keep being called. On a Triton without the hooks
    (before `triton.knobs`), `available` is False and nothing is recorded."""

    def __init__(self) -> None:
        self.compiles: list[TritonCompile] = []
        self._started: dict[str, float] = {}  # specialization -> host time of its cache miss
        self._runtime = _runtime_knobs()
        self._previous: tuple = (None, None)

    @property
    def available(self) -> bool:
        return self._runtime is not None

    def __enter__(self) -> TritonCompileLog:
        if self._runtime is not None:
            self._previous = (self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook)
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        if self._runtime is not None:
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._previous

    def take(self) -> list[TritonCompile]:
        taken, self.compiles = self.compiles, []
        return taken

    def _before(self, *args, **kwargs):
        self._started[kwargs.get("repr", "")] = time.perf_counter()
        return _chained(self._previous[0], args, kwargs)  # a true result tells Triton to skip the compile

    def _after(self, *args, **kwargs):
        specialization = kwargs.get("repr", "")
        started = self._started.pop(specialization, time.perf_counter())
        function = kwargs.get("fn")
        name = getattr(function, "name", None) or specialization.split("[", 1)[0]
        self.compiles.append(TritonCompile(name, time.perf_counter() - started, specialization))
        return _chained(self._previous[1], args, kwargs)


def summarize(compiles: list[TritonCompile]) -> dict:
    """A bench row's view: how many compiles, their seconds, and the kernels (a name per compile)."""
    return {"triton_compiles": len(compiles), "triton_compile_s": round(sum(c.seconds for c in compiles), 3),
            "triton_compiled": [c.kernel for c in compiles]}


def _chained(hook, args, kwargs):
    return hook(*args, **kwargs) if hook is not None else None


def _runtime_knobs():
    from model_shards.attention.triton_runtime import triton  # the interpreter choice comes first

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton < 3.4 has no knobs
    return runtime if hasattr(runtime, "jit_post_compile_hook") else None
