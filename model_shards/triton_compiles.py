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

import inspect
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


class LaunchKeys:
    """The specialization key of every launch of some kernels while entered (through their pre-run
    hooks, which Triton calls with the launch's arguments, compiled or in its interpreter): a test
    that a kernel's key stays one as lengths grow is a test that it never compiles mid-prompt."""

    def __init__(self, *kernels) -> None:
        self.keys = {kernel: [] for kernel in kernels}
        self._recorders = {kernel: self._recorder(kernel) for kernel in kernels}

    def __enter__(self) -> LaunchKeys:
        for kernel, recorder in self._recorders.items():
            kernel.pre_run_hooks.append(recorder)
        return self

    def __exit__(self, *exc) -> None:
        for kernel, recorder in self._recorders.items():
            kernel.pre_run_hooks.remove(recorder)  # ours, wherever later hooks put theirs

    def _recorder(self, kernel):
        return lambda *args, **kwargs: self.keys[kernel].append(specialization_key(kernel, args, kwargs))


def specialization_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What of a launch's arguments Triton's compile cache key holds (triton/runtime/jit.py,
    `specialize_impl`, Triton 3.x): a constexpr's value; an integer's type (i32 / i64 / u64) and,
    unless it is in the kernel's do_not_specialize, whether it is 1 or a multiple of 16; a float's
    type; a tensor's dtype and whether its address is 16-byte aligned; launch options (num_warps)."""
    names = list(kernel.arg_names)
    values = {**dict(zip(names, args)), **kwargs}
    unspecialized, constants = _do_not_specialize(kernel), _constexpr_names(kernel)
    key = tuple((name, values[name] if name in constants else _specialization(values[name], name in unspecialized))
                for name in names if name in values)
    return key + tuple(sorted((name, value) for name, value in kwargs.items() if name not in names))


def _specialization(value, unspecialized: bool):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        if unspecialized:
            return kind
        return "1" if value == 1 else (kind, "D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    if hasattr(value, "data_ptr"):
        return str(value.dtype), value.data_ptr() % 16 == 0
    return value  # a constexpr's value


def _constexpr_names(kernel) -> set[str]:
    annotations = inspect.get_annotations(kernel.fn)
    return {name for name, annotation in annotations.items() if "constexpr" in str(annotation)}


def _do_not_specialize(kernel) -> set[str]:
    """Names of the parameters Triton does not specialize (compiled kernel or interpreted one)."""
    if hasattr(kernel, "params"):  # JITFunction
        return {param.name for param in kernel.params if param.do_not_specialize}
    listed = kernel.kwargs.get("do_not_specialize") or ()  # InterpretedFunction keeps the decorator's arguments
    names = kernel.arg_names
    return {names[item] if isinstance(item, int) else item for item in listed}


def _chained(hook, args, kwargs):
    return hook(*args, **kwargs) if hook is not None else None


def _runtime_knobs():
    from model_shards.attention.triton_runtime import triton  # the interpreter choice comes first

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton < 3.4 has no knobs
    return runtime if hasattr(runtime, "jit_post_compile_hook") else None
