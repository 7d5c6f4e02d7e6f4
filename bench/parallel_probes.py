"""What bench/parallel.py records on every rank, to say where a parallel layer's time goes.

- `LayerProbe`: CUDA events around every decoder layer and its attention, on one clock per rank
  that starts at a barrier (so ranks line up: a late rank shows as a later start), and the
  memory each layer allocates (peak, allocator retries, cudaMalloc / cudaFree calls: signs of
  fragmentation). Allocator statistics are host-side, exact per layer even when the host runs
  ahead of the GPU.
- `TracedGroup` / `TracedBackend`: the SP attention backend with events around each attention
  kernel, each wait on a ring exchange (the compute stream stalled on NCCL) and each decode
  all-gather, filed under the layer that ran them.
- `GpuSampler`: a thread reading the GPU's SM clock, power, temperature and clock-event
  (throttle) reasons every 50 ms through NVML; each layer's window summarizes them.
On a CPU (--dry-run) events fall back to the host clock and the sampler and memory read nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.sp_attention import SequenceParallelBackend


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock (for --dry-run on the CPU)."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, other: HostEvent) -> float:
        return (other.time - self.time) * 1e3  # milliseconds, as CUDA events report


def new_event():
    return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else HostEvent()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- memory ---------------------------------------------------------------------------------------

_ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def allocator_counts(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return dict.fromkeys(_ALLOCATOR_COUNTS, 0)
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(name, 0)) for name in _ALLOCATOR_COUNTS}


def gib(count: int) -> float:
    return count / 2**30


# --- GPU clocks, power, temperature ---------------------------------------------------------------

THROTTLE_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                    0x80: "hw_power_brake"}


class GpuSampler:
    """NVML readings of one GPU every `period_s` on a daemon thread: (host time, SM MHz, W, C, reasons)."""

    def __init__(self, device: torch.device, period_s: float = 0.05):
        self.samples: list[tuple[float, int, float, int, int]] = []
        self.error = None
        self._stop = threading.Event()
        self._handle, self._nvml = self._open(device)
        if self._handle is not None:
            threading.Thread(target=self._run, args=(period_s,), daemon=True).start()

    def _open(self, device: torch.device):
        if device.type != "cuda":
            self.error = "no GPU"
            return None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                handle = torch.cuda._get_pynvml_handler(device)  # maps CUDA's index to NVML's
            except (AttributeError, RuntimeError):
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
            return handle, pynvml
        except Exception as error:  # no pynvml or no NVML access: the bench runs without it
            self.error = f"{type(error).__name__}: {error}"
            return None, None

    def read(self) -> tuple[float, int, float, int, int]:
        nvml, handle = self._nvml, self._handle
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return (time.perf_counter(), nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                nvml.nvmlDeviceGetPowerUsage(handle) / 1e3, nvml.nvmlDeviceGetTemperature(handle, 0),
                int(reasons(handle)))

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.samples.append(self.read())
            except Exception as error:  # a reading that fails once fails every time: stop
                self.error = f"{type(error).__name__}: {error}"
                return

    def temperature(self) -> int | None:
        """Degrees C now, or None without NVML (or when it cannot read the GPU)."""
        try:
            return self.read()[3] if self._handle is not None else None
        except Exception as error:  # NVML errors have many types; the bench goes on without them
            self.error = f"{type(error).__name__}: {error}"
            return None

    def window(self, start: float, stop: float) -> dict:
        """Summary of the samples taken between two host times."""
        inside = [s for s in self.samples if start <= s[0] <= stop]
        if not inside:
            return {}
        clocks, watts, temps = [s[1] for s in inside], [s[2] for s in inside], [s[3] for s in inside]
        reasons = 0
        for sample in inside:
            reasons |= sample[4]
        return {"sm_MHz_min": min(clocks), "sm_MHz_mean": sum(clocks) / len(clocks), "W_mean": sum(watts) / len(watts),
                "C_max": max(temps), "throttle": [name for bit, name in THROTTLE_REASONS.items() if reasons & bit]}


# --- per-layer events ----------------------------------------------------------------------------


@dataclass
class LayerRecord:
    index: int
    events: dict[str, list] = field(default_factory=dict)  # "layer" / "attention" -> [start, stop]
    steps: list[tuple[str, object, object]] = field(default_factory=list)  # (kind, start, stop) in order
    memory: dict = field(default_factory=dict)


class LayerProbe:
    """Hooks on every decoder layer and its attention; `start()` before a forward, `rows()` after."""

    def __init__(self, model, device: torch.device, sampler: GpuSampler | None = None):
        self.device, self.sampler = device, sampler
        self.records: list[LayerRecord] = []
        self._zero, self._zero_host = None, 0.0
        for index, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda *_, i=index: self._enter_layer(i))
            layer.register_forward_hook(lambda *_: self._leave_layer())
            layer.self_attn.register_forward_pre_hook(lambda *_: self._mark("attention", 0))
            layer.self_attn.register_forward_hook(lambda *_: self._mark("attention", 1))

    def start(self) -> None:
        """Forget earlier records; the clock's zero is now (call right after a barrier)."""
        synchronize()
        self.records = []
        self._zero, self._zero_host = new_event(), time.perf_counter()
        self._zero.record()

    def _enter_layer(self, index: int) -> None:
        record = LayerRecord(index)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            record.memory = {"before": torch.cuda.memory_allocated(self.device), **allocator_counts(self.device)}
        self.records.append(record)
        self._mark("layer", 0)

    def _leave_layer(self) -> None:
        self._mark("layer", 1)
        record = self.records[-1]
        if self.device.type == "cuda":
            counts = allocator_counts(self.device)
            record.memory = {"before_GiB": gib(record.memory["before"]),
                             "after_GiB": gib(torch.cuda.memory_allocated(self.device)),
                             "peak_GiB": gib(torch.cuda.max_memory_allocated(self.device)),
                             "reserved_GiB": gib(torch.cuda.memory_reserved(self.device)),
                             **{name: counts[name] - record.memory[name] for name in _ALLOCATOR_COUNTS}}

    def _mark(self, kind: str, edge: int) -> None:
        if not self.records:
            return
        event = new_event()
        event.record()
        self.records[-1].events.setdefault(kind, [None, None])[edge] = event

    def step(self, kind: str, start, stop) -> None:
        """A traced kernel, wait or gather of the current layer (TracedGroup, TracedBackend)."""
        if self.records:
            self.records[-1].steps.append((kind, start, stop))

    def seconds(self, kind: str) -> list[float]:
        synchronize()
        return [r.events[kind][0].elapsed_time(r.events[kind][1]) / 1e3 for r in self.records if kind in r.events]

    def rows(self, rank: int) -> list[dict]:
        """Per layer: start and end on this rank's clock (s since start()), durations, the traced
        steps, memory and the GPU's state over the layer."""
        synchronize()
        rows = []
        for record in self.records:
            begin, end = (self._zero.elapsed_time(e) / 1e3 for e in record.events["layer"])
            attention = record.events.get("attention")
            row = {"rank": rank, "layer": record.index, "start_s": begin, "end_s": end, "layer_s": end - begin,
                   "attention_s": attention[0].elapsed_time(attention[1]) / 1e3 if attention else None,
                   "steps": [(kind, a.elapsed_time(b) / 1e3) for kind, a, b in record.steps], **record.memory}
            if self.sampler is not None:
                row["gpu"] = self.sampler.window(self._zero_host + begin, self._zero_host + end)
            rows.append(row)
        return rows


# --- traced SP attention ---------------------------------------------------------------------------


class _TracedWork:
    def __init__(self, work, probe: LayerProbe):
        self.work, self.probe = work, probe

    def wait(self) -> None:
        start, stop = new_event(), new_event()
        start.record()
        self.work.wait()  # NCCL: the compute stream waits for the exchange from here
        stop.record()
        self.probe.step("wait", start, stop)


@dataclass(frozen=True, eq=False)
class TracedGroup(ParallelGroup):
    """An SP group whose ring exchanges and all-gathers file their waits with a probe."""

    probe: LayerProbe | StepLog | None = None

    @classmethod
    def of(cls, group: ParallelGroup, probe: LayerProbe | StepLog) -> TracedGroup:
        return cls(group.rank, group.size, group.ranks, group.process_group, group.device, probe)

    def start_ring_exchange(self, send, recv) -> list:
        return [_TracedWork(work, self.probe) for work in super().start_ring_exchange(send, recv)]

    def all_gather_stacked(self, tensor: torch.Tensor) -> torch.Tensor:
        start, stop = new_event(), new_event()
        start.record()
        gathered = super().all_gather_stacked(tensor)
        stop.record()
        self.probe.step("gather", start, stop)
        return gathered


class StepLog:
    """A `probe` for TracedGroup outside a model: every traced step in order, on one rank's clock."""

    def __init__(self):
        self.entries: list[tuple[str, object, object]] = []
        self._zero = None

    def start(self) -> None:
        synchronize()
        self.entries, self._zero = [], new_event()
        self._zero.record()

    def step(self, kind: str, start, stop) -> None:
        self.entries.append((kind, start, stop))

    def timed(self, kind: str, fn):
        start, stop = new_event(), new_event()
        start.record()
        result = fn()
        stop.record()
        self.step(kind, start, stop)
        return result

    def rows(self) -> list[tuple[str, float, float]]:
        """(kind, start s, seconds) of every step, in order."""
        synchronize()
        return [(kind, self._zero.elapsed_time(a) / 1e3, a.elapsed_time(b) / 1e3) for kind, a, b in self.entries]


def traced_kernel(kernel, probe):
    """`kernel` with events around every call, filed with `probe` as "causal" or "block<q>x<k>"."""
    def run(q, k, v, scale, causal):
        start, stop = new_event(), new_event()
        start.record()
        result = kernel(q, k, v, scale, causal)
        stop.record()
        probe.step("causal" if causal else f"block{q.shape[0]}x{k.shape[0]}", start, stop)
        return result
    return run


class TracedBackend(SequenceParallelBackend):
    """The SP backend (over a TracedGroup) with events around every attention kernel call."""

    def _kernels_for(self, query, key):
        if self._kernels is None:
            super()._kernels_for(query, key)
            self._kernels = tuple(traced_kernel(kernel, self.group.probe) for kernel in self._kernels)
        return self._kernels
