"""Load generator for the HTTP API, in the manner of `vllm bench serve`, plus the serving overhead.

Fixed input and output lengths (random token ids, ignore_eos), Poisson arrivals at --request-rate
and at most --max-concurrency requests in flight. Each workload runs twice on the same model in
the same run: against the engine called directly (AsyncEngine in this process) and through HTTP
and Ray Serve, once per --served path (SERVED_PATHS: `fused_local`, the default application of one
replica: the proxy streams from the LLM server replica, model worker inside it; `split_ray`,
session 4's: proxy -> OpenAIIngress -> router -> LLM server -> model worker as a Ray actor through a
compiled graph; `split_local`). The difference is the overhead; bench/serve_overhead.py splits it.

Two workloads: `overhead` (one request at a time: TTFT and ITL without queueing) and `load`.
Reports TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99), throughput and goodput (requests
per second meeting --slo-ttft-ms and --slo-tpot-ms). Writes bench/results/serve_load.json.

`--arrival-gap-ab A,B --repeats N` A/Bs serve.arrival_gap_s in one process instead: at each
workload, N runs with each gap alternately (A B A B ...) on the same engine, then on the same
replica (the gap changed through a Serve handle, no restart), each run on fresh prompts; reports per
gap the median and min-max of TTFT p50, TPOT and output tok/s, and A's medians against B's.

    python bench/serve_load.py                      # makes a tiny model in a temp folder
    python bench/serve_load.py --model models/small --num-prompts 128 --request-rate 4
    # on a GPU (bench/gpu_serve.sh): the 8B shape, a shared 32K prefix, the Redis tier, 1/16/64 at once
    python bench/serve_load.py --preset llama3-8b-shape --layers 2 --block-size 64 --num-kv-blocks 0 \
        --shared-prefix-len 32768 --concurrency 1 16 64 --redis-url redis://127.0.0.1:6379
    python bench/serve_load.py --served fused_direct --arrival-gap-ab 0.004,0 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:  # run as a script (bench/ first on sys.path) or imported as bench.serve_load (the tests)
    from engine_steps import engine_counters, format_step_report, step_report
except ImportError:
    from bench.engine_steps import engine_counters, format_step_report, step_report

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "serve_load.json"


# --- workload and per-request records ------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_len: int
    arrival_offsets_s: list[float]  # Poisson process; all zeros for an infinite rate
    max_concurrency: int


@dataclass
class RequestRecord:
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float:
        return (self.token_times[-1] - self.token_times[0]) / max(1, len(self.token_times) - 1)


def make_workload(name, num_prompts, input_len, output_len, rate, concurrency, vocab_size, seed,
                  shared_prefix: list[int] = ()) -> Workload:
    rng = random.Random(seed)
    # Ids above 100 avoid the special tokens; distinct prompts keep the prefix cache out of it,
    # but for the shared prefix (a long document every request asks about), when one is given.
    prompts = [list(shared_prefix) + [rng.randrange(100, vocab_size) for _ in range(input_len)]
               for _ in range(num_prompts)]
    offsets, now = [], 0.0
    for _ in range(num_prompts):
        offsets.append(now)
        now += 0.0 if rate == float("inf") else rng.expovariate(rate)
    return Workload(name, prompts, output_len, offsets, concurrency)


ROUND_SEED_STRIDE = 1_000_003  # one round's seeds apart from every other round's (levels stay below it)


def workload_makers(args, vocab_size: int, prefix: list[int]) -> list[Callable[[int], Workload]]:
    """The overhead workload and one load workload per --concurrency level, each as maker(round):
    round 0 gives the prompts the bench has always run, every other round fresh ones (ArrivalGapAB)."""
    common = (args.input_len, args.output_len)

    def maker(name: str, count: int, rate: float, level: int, seed: int) -> Callable[[int], Workload]:
        return lambda round_: make_workload(name, count, *common, rate, level, vocab_size,
                                            seed + ROUND_SEED_STRIDE * round_, prefix)

    shapes = [("overhead", args.overhead_requests, float("inf"), 1, args.seed)]
    shapes += [(f"load_c{level}", max(args.num_prompts, 2 * level), args.request_rate, level, args.seed + level)
               for level in args.concurrency]
    return [maker(*shape) for shape in shapes]


Sender = Callable[[list[int], int, RequestRecord], Awaitable[None]]


async def run_workload(send: Sender, workload: Workload,
                       before_clock: Callable[[], Awaitable[None]] | None = None) -> tuple[list[RequestRecord], float]:
    """The workload's records and its wall time; `before_clock` runs once the bodies are built,
    right before the clock starts (the engine's counters read: _run_all)."""
    # What each request sends is built before the clock starts (`send.encode`, the HTTP body): the
    # bench's clients share one loop, so a body encoded inside the timed send would wait for every
    # other client's encode (2.4-4 ms each for a 33K-token body: 150 ms for the last of 64), a cost
    # that clients on machines of their own pay in parallel, and no part of the server's.
    encode = getattr(send, "encode", None)
    payloads = [encode(prompt, workload.output_len) if encode else prompt for prompt in workload.prompts]
    if before_clock is not None:
        await before_clock()
    limit = asyncio.Semaphore(workload.max_concurrency)
    begin = time.perf_counter()

    async def one(payload, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, begin + offset - time.perf_counter()))
        record = RequestRecord()
        async with limit:
            record.start = time.perf_counter()
            try:
                await send(payload, workload.output_len, record)
            except Exception as error:  # noqa: BLE001 - counted, reported, not fatal
                record.error = repr(error)
            record.end = time.perf_counter()
        return record

    records = await asyncio.gather(*(one(p, o) for p, o in zip(payloads, workload.arrival_offsets_s)))
    return list(records), time.perf_counter() - begin


# --- the two ways in -----------------------------------------------------------------------------
def direct_sender(engine) -> Sender:
    from protocol.sampling_params import SamplingParams

    counter = iter(range(1 << 62))

    async def send(prompt: list[int], output_len: int, record: RequestRecord) -> None:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(f"bench-{next(counter)}", prompt, params):
            now = time.perf_counter()
            record.token_times.extend(now for _ in delta.token_ids)

    return send


def http_session(max_connections: int):
    """The bench's HTTP client (an async context manager), for `http_sender`. aiohttp, not httpx:
    one client process plays every caller, and httpx spent ~4x the CPU a streamed request (7.6-9.9
    against 1.8-2.3 ms on the CPU machine, 64 events of a 33K-token prompt; at 16 streams the bench
    process was ~60% busy on the H100 host, session 16), which delays the callers' next requests:
    the client's cost, not the server's."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


class http_sender:  # noqa: N801 - a Sender, called like direct_sender's
    """Streamed completions through HTTP; `encode` builds a request's body (run_workload calls it
    before the clock starts), the call sends it and times each streamed chunk."""

    def __init__(self, client, url: str, model: str):
        self.client, self.url, self.model = client, url, model

    def encode(self, prompt: list[int], output_len: int) -> bytes:
        return json.dumps({"model": self.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                           "ignore_eos": True, "stream": True}).encode()  # fmt: skip

    async def __call__(self, body: bytes, output_len: int, record: RequestRecord) -> None:
        headers = {"content-type": "application/json"}
        async with self.client.post(f"{self.url}/v1/completions", data=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:  # one line at a time
                if line.startswith(b"data: {"):  # one chunk per engine delta, one token each
                    record.token_times.append(time.perf_counter())


# --- summaries -----------------------------------------------------------------------------------
def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": round(statistics.fmean(values) * 1e3, 3), "p50": round(pick(0.5) * 1e3, 3),
            "p99": round(pick(0.99) * 1e3, 3)}  # fmt: skip


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    done = [r for r in records if r.error is None and r.token_times]
    good = [r for r in done if r.ttft <= slo_ttft_s and r.tpot <= slo_tpot_s]
    output_tokens = sum(len(r.token_times) for r in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": round(duration_s, 3),
        "request_throughput_per_s": round(len(done) / duration_s, 3),
        "output_throughput_tok_per_s": round(output_tokens / duration_s, 1),
        "goodput_per_s": round(len(good) / duration_s, 3),
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms([r.tpot for r in done]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itls]),
        "e2e_ms": _stats_ms([r.end - r.start for r in done]),
        "errors": sorted({r.error for r in records if r.error})[:3],
    }


def overhead(direct: dict, served: dict) -> dict[str, float]:
    """Added by HTTP + Serve, in ms: the figures the serving layer is held to."""
    return {
        "ttft_mean_ms": round(served["ttft_ms"]["mean"] - direct["ttft_ms"]["mean"], 3),
        "ttft_p50_ms": round(served["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"], 3),
        "itl_mean_ms": round(served["itl_ms"]["mean"] - direct["itl_ms"]["mean"], 3),
        "tpot_mean_ms": round(served["tpot_ms"]["mean"] - direct["tpot_ms"]["mean"], 3),
    }


def relative_overhead(direct: dict, served: dict) -> str:
    """Served over direct, in percent: TTFT and TPOT means (higher is worse), output tok/s (lower is worse)."""
    def change(key: str, metric: str | None) -> float:
        a = direct[key][metric] if metric else direct[key]
        b = served[key][metric] if metric else served[key]
        return (b / a - 1) * 100 if a else float("nan")

    return (f"TTFT {change('ttft_ms', 'mean'):+.1f}%, TPOT {change('tpot_ms', 'mean'):+.1f}%, "
            f"output tok/s {change('output_throughput_tok_per_s', None):+.1f}%")


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    header = f"{'path':<22}{'ok':>5}{'req/s':>8}{'tok/s':>9}{'good/s':>8}"
    for metric in ("ttft", "tpot", "itl", "e2e"):
        header += f"{metric + ' mean/p50/p99 ms':>30}"
    print(header)
    for path, summary in rows.items():
        line = f"{path:<22}{summary['completed']:>5}{summary['request_throughput_per_s']:>8.2f}"
        line += f"{summary['output_throughput_tok_per_s']:>9.1f}{summary['goodput_per_s']:>8.2f}"
        for metric in ("ttft", "tpot", "itl", "e2e"):
            s = summary[f"{metric}_ms"]
            line += f"{s['mean']:>10.2f}{s['p50']:>10.2f}{s['p99']:>10.2f}"
        print(line)


# --- the run -------------------------------------------------------------------------------------
def bench_config(args, model_dir: str):
    from cluster.config import (
        CacheSettings,
        KVTierSettings,
        LongctxConfig,
        ModelSettings,
        SchedulerSettings,
        ServeSettings,
    )

    tiers = KVTierSettings(host_bytes=args.host_kv_bytes, redis_urls=tuple(args.redis_url))
    return LongctxConfig(
        model=ModelSettings(path=model_dir),
        cache=CacheSettings(block_size=args.block_size, num_device_blocks=args.num_kv_blocks or None),
        scheduler=SchedulerSettings(max_num_seqs=max(64, *args.concurrency), **_while_decoding(args),
                                    **_overlap_outputs(args)),
        serve=ServeSettings(max_queued_requests=max(256, args.num_prompts), **_stream_pacing(args),
                            **_arrival_gathering(args)),
        kv_tiers=tiers,
    )


def _while_decoding(args) -> dict:
    """--while-decoding-tokens when given, else the config's default step budget while others decode."""
    tokens = getattr(args, "while_decoding_tokens", None)
    return {} if tokens is None else {"max_tokens_per_step_while_decoding": tokens}


def _overlap_outputs(args) -> dict:
    """--overlap-outputs on / off when given, else the config's default (on)."""
    choice = getattr(args, "overlap_outputs", None)
    return {} if choice is None else {"overlap_outputs": choice == "on"}


def _stream_pacing(args) -> dict:
    """--stream-chunks-per-s when given (0: a chunk per step and stream), else the config's default."""
    rate = getattr(args, "stream_chunks_per_s", None)
    return {} if rate is None else {"stream_chunks_per_s": rate}


def _arrival_gathering(args) -> dict:
    """--arrival-gap-s / --arrival-max-wait-s when given (serve_load's), else the config's defaults."""
    names = ("arrival_gap_s", "arrival_max_wait_s")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


async def run_direct(config, workloads: list[Workload], slo: tuple[float, float],
                     ab: ArrivalGapAB | None = None) -> dict[str, dict]:  # fmt: skip
    """{workload: summary}; with `ab`, {workload: [each run's summary]} (run_ab)."""
    import torch

    from engine.gc_pauses import freeze_startup_objects
    from engine.serving import serving_engine

    # The Ray worker runs torch on as many threads as its CPUs (OMP_NUM_THREADS); so does this.
    torch.set_num_threads(max(1, int(config.serve.worker_num_cpus)))
    # The replica's serve settings (arrival gathering, pacing), the loop on a thread of this process:
    # the engine driven directly, the reference every served path is measured against.
    engine = serving_engine(config.with_overrides({"serve.engine_loop": "thread"}))
    freeze_startup_objects()  # as a served engine's process and replica do (engine/gc_pauses.py)
    try:
        if ab is not None:
            return await run_ab(direct_sender(engine), _engine_gap_setter(engine), ab, slo, "direct")
        return await _run_all(direct_sender(engine), workloads, slo, engine.metrics_exposition)
    finally:
        gc.unfreeze()
        engine.shutdown()
        del engine
        if torch.cuda.is_available():  # the served replicas need the GPU memory this engine held
            gc.collect()
            torch.cuda.empty_cache()


async def _run_all(send: Sender, workloads: list[Workload], slo: tuple[float, float],
                   exposition: Callable[[], Awaitable[str]] | None = None) -> dict[str, dict]:  # fmt: skip
    """{workload: summary}; `exposition`: the engine's Prometheus text, read around each workload
    for what the engine did meanwhile (bench/engine_steps.py)."""
    await _warm_up(send, workloads[0])
    summaries = {}
    for workload in workloads:
        cpu_before = time.process_time()
        window: dict = {}  # the counters read right before the clock starts, and when

        async def read_counters() -> None:
            window["started"] = time.perf_counter()
            window["counters"] = engine_counters(await exposition())

        records, duration = await run_workload(send, workload, read_counters if exposition else None)
        summaries[workload.name] = summarize(records, duration, *slo)
        if exposition is not None:
            # Shares of the counters' own window: before session 18 it also held the bodies'
            # encoding (an idle engine: 77 ms of a 16-stream run's ~0.7 s on the H100 host) over
            # the workload's wall time alone, and served runs showed idle shares they did not have.
            after = engine_counters(await exposition())
            summaries[workload.name]["engine"] = step_report(window["counters"], after,
                                                             time.perf_counter() - window["started"])
        # This process's CPU a request: the bench client's alone through HTTP (the server runs in
        # Ray's processes), client + engine direct. Near 1 s a second, the client limits the run.
        summaries[workload.name]["this_process_cpu_ms_per_request"] = round(
            (time.process_time() - cpu_before) / max(1, len(records)) * 1e3, 3)
    return summaries


async def _warm_up(send: Sender, workload: Workload) -> None:
    """Two of `workload`'s prompts, 4 tokens each: the first measured run pays no first-call costs
    (nor the shared prefix's prefill, cached from here on)."""
    await run_workload(send, Workload("warmup", workload.prompts[:2], 4, [0.0, 0.0], 2))


# --- A/B of the arrival gap in one process -------------------------------------------------------
# Session 11 ran each gap in a process of its own, one run each: they differed 22-29% run to run,
# more than the effect sought (docs/benchmarks.md). Here one engine (then one replica) runs both
# gaps alternately at each workload, so drift and warm-up weigh on both alike, and repeats show the
# spread.
AB_METRICS = {  # reported per gap over its repeats; how each is read from a run's summary
    "ttft_p50_ms": lambda summary: summary["ttft_ms"]["p50"],
    "tpot_mean_ms": lambda summary: summary["tpot_ms"]["mean"],
    "output_tok_per_s": lambda summary: summary["output_throughput_tok_per_s"],
}

GapSetter = Callable[[float], Awaitable[None]]


@dataclass
class ArrivalGapAB:
    """--arrival-gap-ab A,B --repeats N: at each workload, N runs with gap A and N with gap B, alternating."""

    gaps: tuple[float, float]
    repeats: int
    makers: list[Callable[[int], Workload]]  # workload_makers: maker(round) -> that round's prompts
    # Each run takes a round of its own, across the whole process: prompts run before would be in
    # the prefix cache whole (or in the Redis tier, which direct and HTTP share), no longer prefilled.
    rounds: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # round 0: the warm-up's


def ab_order(gaps: tuple[float, ...], repeats: int) -> list[float]:
    """The gap of each run in turn: A B A B ... (each repeat runs every gap once, in the order given)."""
    return [gap for _ in range(repeats) for gap in gaps]


def gap_label(gap: float) -> str:
    return f"gap_{gap:g}s"


async def run_ab(send: Sender, set_gap: GapSetter, ab: ArrivalGapAB, slo: tuple[float, float],
                 label: str) -> dict[str, list[dict]]:  # fmt: skip
    """{workload: [each run's summary, with its arrival_gap_s]}, runs in `ab_order`, the gap set
    before each; a progress line per run as it ends (what a run cut short by a timeout still shows)."""
    await _warm_up(send, ab.makers[0](0))
    runs: dict[str, list[dict]] = {}
    for make in ab.makers:
        for gap in ab_order(ab.gaps, ab.repeats):
            await set_gap(gap)
            workload = make(next(ab.rounds))
            records, duration = await run_workload(send, workload)
            summary = {"arrival_gap_s": gap, **summarize(records, duration, *slo)}
            runs.setdefault(workload.name, []).append(summary)
            _print_progress(f"{label} {gap_label(gap)}", {workload.name: summary})
    return runs


def _engine_gap_setter(engine) -> GapSetter:
    async def set_gap(gap: float) -> None:
        engine.set_arrival_gap(gap)

    return set_gap


def _replica_gap_setter() -> GapSetter:
    """The gap of the bench app's LLM server replica, set through a Serve handle
    (LLMServer.set_arrival_gap): no redeploy, which would reload the model. One replica: a handle
    call reaches one, so the gap it answers with must be the one asked for."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=BENCH_APP)

    async def set_gap(gap: float) -> None:
        in_force = await handle.set_arrival_gap.remote(gap)
        if in_force != gap:
            raise RuntimeError(f"the replica's arrival_gap_s is {in_force}, not {gap}")

    return set_gap


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}


def _change_pct(value: float, reference: float) -> float:
    return round((value / reference - 1) * 100, 1) if reference else float("nan")


def summarize_ab(runs: list[dict]) -> dict:
    """One path's runs of one workload (run_ab): per gap, each AB_METRICS' median and min-max over
    its repeats; the first gap's medians against the second's, in percent; whether the two min-max
    ranges overlap (if they do, the difference is within this run's run-to-run spread)."""
    by_gap: dict[float, list[dict]] = {}
    for run in runs:
        by_gap.setdefault(run["arrival_gap_s"], []).append(run)
    variants = {gap_label(gap): {metric: _spread([read(run) for run in group]) for metric, read in AB_METRICS.items()}
                for gap, group in by_gap.items()}  # fmt: skip
    first, second = variants.values()  # the gaps in the order of the first runs: A, then B
    return {
        "order": [gap_label(run["arrival_gap_s"]) for run in runs],
        "repeats": {gap_label(gap): len(group) for gap, group in by_gap.items()},
        "variants": variants,
        "compared": " against ".join(variants),
        "median_change_pct": {m: _change_pct(first[m]["median"], second[m]["median"]) for m in AB_METRICS},
        "ranges_overlap": {m: max(first[m]["min"], second[m]["min"]) <= min(first[m]["max"], second[m]["max"])
                           for m in AB_METRICS},  # fmt: skip
        "runs": runs,
    }


def print_ab_table(title: str, by_path: dict[str, dict]) -> None:
    """summarize_ab's figures, one row per path and gap, then each path's change of medians."""
    print(f"\n{title}")
    print(f"{'path':<22}{'gap':<12}" + "".join(f"{metric + ' median [min-max]':>34}" for metric in AB_METRICS))
    for path, ab in by_path.items():
        for variant, figures in ab["variants"].items():
            cells = (f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]" for s in figures.values())
            print(f"{path:<22}{variant:<12}" + "".join(f"{cell:>34}" for cell in cells))
        changes = [f"{metric} {ab['median_change_pct'][metric]:+.1f}%" + ("" if ab["ranges_overlap"][metric]
                   else " (ranges apart)") for metric in AB_METRICS]  # fmt: skip
        print(f"  {path} {ab['compared']}: {', '.join(changes)}")


BENCH_APP = "bench"  # the Serve application's name

# How the application is laid out: the LLM server serving HTTP itself or behind an ingress
# deployment, the model worker inside the replica or a Ray actor.
SERVED_PATHS = {
    "fused_local": {"serve.ingress_in_replica": True, "parallel.executor": "local"},
    # fused_local with Serve's direct ingress: the client talks HTTP to the replica, no proxy. The
    # engine loop where serve.engine_loop auto puts it (a child process on a GPU, since session 14).
    "fused_direct": {"serve.ingress_in_replica": True, "parallel.executor": "local"},
    # fused_direct with the engine loop on a thread of the replica (the default before session 14).
    "fused_direct_thread": {"serve.ingress_in_replica": True, "parallel.executor": "local",
                            "serve.engine_loop": "thread"},
    # fused_direct with the engine loop and its worker in a child process of the replica
    # (serve.engine_loop: process): the replica's HTTP Python no longer shares the engine's GIL.
    "fused_direct_process": {"serve.ingress_in_replica": True, "parallel.executor": "local",
                             "serve.engine_loop": "process"},
    "split_local": {"serve.ingress_in_replica": False, "parallel.executor": "local"},
    "split_ray": {"serve.ingress_in_replica": False, "parallel.executor": "ray"},
}


def run_served(config, path: str, workloads: list[Workload], slo: tuple[float, float],
               ab: ArrivalGapAB | None = None) -> dict[str, dict]:  # fmt: skip
    """{workload: summary}; with `ab`, {workload: [each run's summary]} (run_ab)."""
    from engine.gc_pauses import freeze_startup_objects

    url, model = start_served(config.with_overrides(SERVED_PATHS[path]), direct_ingress=path.startswith("fused_direct"))
    freeze_startup_objects()  # the client's own pauses would count against the served path
    try:
        async def go():
            async with http_session(workloads[-1].max_concurrency + 8) as client:
                send = http_sender(client, url, model)
                if ab is not None:
                    return await run_ab(send, _replica_gap_setter(), ab, slo, f"http_{path}")
                return await _run_all(send, workloads, slo, _metrics_reader(client, url))

        return asyncio.run(go())
    finally:
        gc.unfreeze()
        stop_served()


def _metrics_reader(client, url: str) -> Callable[[], Awaitable[str]]:
    async def read() -> str:
        async with client.get(f"{url}/metrics") as response:
            response.raise_for_status()
            return await response.text()

    return read


def start_served(config, direct_ingress: bool = False) -> tuple[str, str]:
    """A local Ray with longctx's application on a free port: (base URL, served model name).
    `direct_ingress`: that port is the replica's own (deployments/app.py direct_ingress_env);
    Serve's proxy gets another."""
    import ray
    from ray import serve

    from cluster.serve import _cpus_needed
    from deployments.app import build_application, direct_ingress_env
    from deployments.ingress import served_model_name

    port, proxy_port = _free_port(), _free_port()
    env = direct_ingress_env(port) if direct_ingress else {}
    # The local Ray's processes inherit this process's environment; stop_served takes it back.
    os.environ.update(env)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, _cpus_needed(config)), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port if direct_ingress else port})
    serve.run(build_application(config), name=BENCH_APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", served_model_name(config)


def stop_served() -> None:
    import ray
    from ray import serve

    from deployments.app import direct_ingress_env

    serve.shutdown()
    ray.shutdown()
    for name in direct_ingress_env(0):
        os.environ.pop(name, None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model_dir(args) -> str:
    if args.model:
        return args.model
    from model_shards.make_model import make_model

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return str(make_model(Path(tempfile.mkdtemp(prefix="longctx-bench-")) / args.preset, args.preset, **overrides))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: make --preset in a temp folder)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=16.0, help="Poisson arrivals per second (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="one load workload per level (default: --max-concurrency)")
    parser.add_argument("--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--host-kv-bytes", type=int, default=0, help="host KV tier (needed by --redis-url)")
    parser.add_argument("--redis-url", action="append", default=[], help="Redis KV tier (repeatable)")
    parser.add_argument("--overhead-requests", type=int, default=16, help="one-at-a-time requests of the overhead workload")
    parser.add_argument("--served", nargs="+", default=["split_ray", "fused_local"], choices=sorted(SERVED_PATHS),
                        help="application layouts to serve through (SERVED_PATHS)")
    parser.add_argument("--num-kv-blocks", type=int, default=4096, help="0: sized from device memory")
    parser.add_argument("--stream-chunks-per-s", type=float, default=None,
                        help="serve.stream_chunks_per_s of the replicas (default: the config's)")
    parser.add_argument("--arrival-gap-s", type=float, default=None,
                        help="serve.arrival_gap_s of the replicas: an idle engine gathers a burst (0: off; "
                        "default: the config's)")
    parser.add_argument("--arrival-gap-ab", type=_two_gaps, default=None, metavar="A,B",
                        help="A/B of serve.arrival_gap_s in one process (e.g. 0.004,0): at each workload, --repeats "
                        "runs with gap A and with gap B alternately, on the same engine and the same replica, each "
                        "on fresh prompts; per gap the median and min-max over repeats, A's medians against B's")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each gap with --arrival-gap-ab")
    parser.add_argument("--arrival-max-wait-s", type=float, default=None,
                        help="serve.arrival_max_wait_s of the replicas (default: the config's)")
    parser.add_argument("--while-decoding-tokens", type=int, default=None,
                        help="scheduler.max_tokens_per_step_while_decoding: how many of a burst's prompts a step "
                        "admits beside decodes (default: the config's)")
    parser.add_argument("--overlap-outputs", choices=("on", "off"), default=None,
                        help="scheduler.overlap_outputs: a step's text made while the next step runs (default: "
                        "the config's)")
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_PATH))
    args = parser.parse_args()
    if args.arrival_gap_ab and args.arrival_gap_s is not None:
        parser.error("--arrival-gap-ab sets the gap of each run: leave --arrival-gap-s out")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.concurrency = args.concurrency or [args.max_concurrency]
    if args.redis_url and not args.host_kv_bytes:
        args.host_kv_bytes = 4 << 30
    return args


def _two_gaps(text: str) -> tuple[float, float]:
    gaps = tuple(float(part) for part in text.split(","))
    if len(gaps) != 2 or min(gaps) < 0 or gaps[0] == gaps[1]:
        raise argparse.ArgumentTypeError(f"two different gaps >= 0 in seconds, like 0.004,0; got {text!r}")
    return gaps


def main() -> None:
    args = _parse_args()
    model_dir = _model_dir(args)
    config = bench_config(args, model_dir)
    from model_folder.hf_config import load_architecture

    vocab = load_architecture(model_dir).vocab_size
    prefix = random.Random(args.seed - 1).choices(range(100, vocab), k=args.shared_prefix_len)
    makers = workload_makers(args, vocab, prefix)
    workloads = [make(0) for make in makers]
    ab = ArrivalGapAB(args.arrival_gap_ab, args.repeats, makers) if args.arrival_gap_ab else None
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    results = {"direct": asyncio.run(run_direct(config, workloads, slo, ab))}
    if ab is None:  # run_ab prints each run as it ends
        _print_progress("direct", results["direct"])
    for path in args.served:
        _write(args, {"partial": True, "results": results})  # what a run cut short still leaves
        if ab is not None:  # and the A/B tables so far, in its log
            _ab_report(args, results, workloads)
        results[f"http_{path}"] = run_served(config, path, workloads, slo, ab)
        if ab is None:
            _print_progress(f"http_{path}", results[f"http_{path}"])
    _write(args, _report(args, results, workloads) if ab is None else _ab_report(args, results, workloads))
    print(f"\nwrote {args.out}")


def _write(args, report: dict) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _print_progress(path: str, summaries: dict[str, dict]) -> None:
    """One line per workload as each path finishes (the tables come at the end)."""
    for name, summary in summaries.items():
        print(f"{path} {name}: {summary['completed']} ok, {summary['failed']} failed, TTFT mean "
              f"{summary['ttft_ms']['mean']} ms, TPOT mean {summary['tpot_ms']['mean']} ms, "
              f"{summary['output_throughput_tok_per_s']} tok/s, this process "
              f"{summary.get('this_process_cpu_ms_per_request', '-')} CPU ms a request {summary['errors'][:1]}", flush=True)
        if "engine" in summary:
            print(f"  {format_step_report(summary['engine'])}", flush=True)


def _machine() -> dict:
    # The load average tells whether other work shared the machine during the run.
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m_at_end": os.getloadavg()[0]}


def _workload_title(args, workload: Workload) -> str:
    return (f"{workload.name}: {len(workload.prompts)} requests, {args.shared_prefix_len}+{args.input_len} in / "
            f"{args.output_len} out, concurrency {workload.max_concurrency}")  # fmt: skip


def _ab_report(args, results: dict[str, dict[str, list[dict]]], workloads: list[Workload]) -> dict:
    """summarize_ab of every path at each workload, printed and in the JSON under `arrival_gap_ab`."""
    report = {"machine": _machine(), "args": vars(args), "arrival_gap_ab": {}}
    for workload in workloads:
        by_path = {path: summarize_ab(runs[workload.name]) for path, runs in results.items()}
        print_ab_table(f"A/B {_workload_title(args, workload)}; {args.repeats} runs of each gap, alternating, "
                       "each on fresh prompts", by_path)  # fmt: skip
        report["arrival_gap_ab"][workload.name] = by_path
    return report


def _report(args, results: dict[str, dict[str, dict]], workloads: list[Workload]) -> dict:
    report = {"machine": _machine(), "args": vars(args), "workloads": {}}
    for workload in workloads:
        rows = {path: summaries[workload.name] for path, summaries in results.items()}
        print_table(_workload_title(args, workload), rows)
        added = {path: overhead(rows["direct"], summary) for path, summary in rows.items() if path != "direct"}
        for path, numbers in added.items():
            print(f"  added by {path}: TTFT {numbers['ttft_mean_ms']:+.2f} ms (goal <= 30), "
                  f"ITL {numbers['itl_mean_ms']:+.2f} ms, TPOT {numbers['tpot_mean_ms']:+.2f} ms (goal <= 2)")  # fmt: skip
            print(f"  {path} against direct: {relative_overhead(rows['direct'], rows[path])} (goal: within 5%)")
        report["workloads"][workload.name] = {"results": rows, "overhead_ms": added}
    return report


if __name__ == "__main__":
    main()
