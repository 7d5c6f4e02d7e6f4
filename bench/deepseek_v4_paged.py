"""DeepSeek-V4 through the engine on its paged hybrid KV cache against the model alone (one in-memory
SequenceState, the same chunks): prefill and decode time, per-chunk device time, a section profile
of one chunk, and KV bytes per token on the pages against the config's formula. One command,
JSON rows as it goes.

CPU, the tiny preset (the issue's CPU figure: a 32K-token prefill):
    python3 bench/deepseek_v4_paged.py
GPU (one H200), the flash shape's first 4 layers with 16 experts, bf16, up to a 1M-token prompt:
    python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \\
        --lengths 32768 131072 524288 1048000 --profile-length 131072 [--alloc-conf expandable_segments:True]

One engine serves every length (a warm-up request first, so no kernel compiles inside a timed
prompt), one request at a time: `--chunk-tokens` per step, then `--decode-steps` greedy tokens
(TTFT and TPOT from engine/offline.py's timings). The model alone runs the same prompt in the same
chunks, synchronized before the clock stops, up to `--model-max-length`. Per chunk: device time
(CUDA events), host time (the chunk's call returning: its launch time on a GPU) and the CUDA
caching allocator's work during the chunk's launch (prefill_chunk_allocator: retries after a failed
cudaMalloc, which free the cache and synchronize; cudaMalloc / cudaFree calls; reserved, allocated
and peak bytes) and the Triton kernels it compiled (triton_compiles / _s / triton_compiled: a new
specialization of a length that grows with the context compiles late in a long prompt), to tell
allocator spikes and compile spikes from others. `--alloc-conf` sets PYTORCH_CUDA_ALLOC_CONF
(e.g. expandable_segments:True) before CUDA starts, so two runs compare the allocators. At
`--profile-length`, CUDA-event sections (bench/deepseek_v4_sections.py plus the pages' own) of
the last chunk of one more prompt that long, on both paths. Writes $OUT/deepseek_v4_paged.json (else
bench/results/) after every length, so a run cut short keeps what it measured. `--concurrency 1 8`
then has N requests decode together (one forward per step for all of them, their appends, key
gathers and attention cores as one batch: model_shards/deepseek_v4/paged_decodes.py): ms per step,
tokens/s, and the aten ops one such step dispatches (op_count.py: all, those that compute, inside
the layers, host syncs), which should not grow with N.
CPU, decode batching on the tiny preset; then one H200, the flash shape:
    python3 bench/deepseek_v4_paged.py --lengths 256 --concurrency 1 8 32
    python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda --lengths 32768 \
        --concurrency 1 8 32 --concurrency-prompt-tokens 4096
`--decode-graphs` measures the --concurrency rows again on an engine whose decode-only steps replay
CUDA graphs (rows tagged "decode_graphs": true; eager rows false), e.g. at 32K contexts:
    python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda --lengths 1024 \
        --model-max-length 0 --concurrency 1 8 32 --concurrency-prompt-tokens 32000 --decode-graphs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4_paged.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings  # noqa: E402
from deepseek_v4_sections import SECTIONS, SectionTimer  # noqa: E402
from parallel_probes import allocator_counts, gib  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.offline import generate  # noqa: E402
from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from model_folder.deepseek_v4_kv_budget import kv_bytes_per_token  # noqa: E402
from model_shards.deepseek_v4.chunk_cores import CHUNK_ATTENTION_CORES  # noqa: E402
from model_shards.deepseek_v4.kernel_choices import INDEX_TOP_K_METHODS, KernelChoices  # noqa: E402
from model_shards.deepseek_v4.kv_pages import compressed_layout  # noqa: E402
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM  # noqa: E402
from model_shards.deepseek_v4.op_count import OpCounter  # noqa: E402
from model_shards.deepseek_v4.presets import make_deepseek_v4_model, preset_config  # noqa: E402
from model_shards.deepseek_v4.runner import DeepseekV4Runner  # noqa: E402
from model_shards.triton_compiles import TritonCompileLog, summarize  # noqa: E402
from protocol.sampling_params import SamplingParams  # noqa: E402

PAGED_SECTIONS = SECTIONS + [
    ("pages: load (window keys, tables)", "model_shards.deepseek_v4.paged_state", "PagedKV.load"),
    ("pages: window key writes", "model_shards.deepseek_v4.paged_state", "WindowPages.keys_appended"),
    ("pages: overlap half writes", "model_shards.deepseek_v4.paged_state", "OverlapPages.windows_closed"),
    ("entries: append", "model_shards.deepseek_v4.entries", "PagedEntries.append"),
    ("entries: append", "model_shards.deepseek_v4.entries", "ContiguousEntries.append"),
    ("entries: CSA top-k gather", "model_shards.deepseek_v4.entries", "PagedEntries.gather"),
    ("entries: CSA top-k gather", "model_shards.deepseek_v4.entries", "ContiguousEntries.gather"),
    ("entries: HCA read", "model_shards.deepseek_v4.entries", "PagedEntries.read"),
    ("entries: HCA read", "model_shards.deepseek_v4.entries", "ContiguousEntries.read"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v4-tiny")
    parser.add_argument("--layers", type=int, default=4, help="flash shape: the first N of its 43 layers")
    parser.add_argument("--experts", type=int, default=16, help="flash shape: routed experts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--chunk-tokens", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--model-max-length", type=int, default=131072, help="longest prompt also run on the model alone")
    parser.add_argument("--profile-length", type=int, default=None, help="CUDA: section profile of this prompt's last chunk")
    parser.add_argument("--time-budget-s", type=float, default=float("inf"), help="start no new length after this")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[],
                        help="then, for each N: N requests decoding together (ms per step, tokens/s)")
    parser.add_argument("--concurrency-prompt-tokens", type=int, default=1024, help="each concurrent request's prompt")
    parser.add_argument("--decode-graphs", action="store_true",
                        help="CUDA: the --concurrency steps eager, then again on an engine whose decode-only steps "
                        "replay CUDA graphs (model_shards/deepseek_v4/decode_graphs.py)")
    parser.add_argument("--chunk-attention", choices=CHUNK_ATTENTION_CORES, default="auto",
                        help="model.deepseek_v4_chunk_attention: prefill chunks' attention core (chunk_cores.py)")
    parser.add_argument("--index-top-k", choices=INDEX_TOP_K_METHODS, default="threshold",
                        help="model.deepseek_v4_index_top_k: the indexer's prefill top-k (kernel_choices.py)")
    parser.add_argument("--alloc-conf", default=None,
                        help="PYTORCH_CUDA_ALLOC_CONF for this run, e.g. expandable_segments:True (default: as set)")
    return parser.parse_args()


def make_folder(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="dsv4-paged-"))
    if args.preset == "deepseek-v4-tiny":
        return make_deepseek_v4_model(out, args.preset)
    return make_deepseek_v4_model(out, args.preset, layers=args.layers, n_routed_experts=args.experts)


def random_prompt(length: int) -> list[int]:
    """Ids 3 .. 999 (valid in every preset's vocabulary), a different prompt per length: no prefix hits."""
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(length)).tolist()


class AllocatorWatch:
    """The CUDA caching allocator's work between its creation and `row()` (host side: the counts
    of the calls a chunk's launch made), with the pool sizes after; peak since its creation."""

    def __init__(self, device: torch.device):
        self.device, self.before = device, allocator_counts(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def row(self) -> dict:
        if self.device.type != "cuda":
            return {}
        after = allocator_counts(self.device)
        stats = torch.cuda.memory_stats(self.device)
        pools = {"reserved_gib": "reserved_bytes.all.current", "allocated_gib": "allocated_bytes.all.current",
                 "peak_allocated_gib": "allocated_bytes.all.peak"}
        return {**{name: after[name] - self.before[name] for name in after},
                **{name: round(gib(stats.get(key, 0)), 3) for name, key in pools.items()}}


class ChunkClock:
    """Times chunks: device ms (CUDA events; on a CPU the call's own time), host ms (the call's
    return: on a GPU the time to launch its work), and CUDA-event sections of the chunk that starts
    at `profile_start`. While entered it also times every DeepseekV4Runner._run_chunks (the engine's
    step: one forward over the chunks of every scheduled request; counted from the first's start)."""

    def __init__(self, device: torch.device, profile_start: int | None = None):
        self.device, self.profile_start = device, profile_start
        self.chunks: list[tuple] = []  # start, tokens, start and end events, host ms, allocator row
        self.sections: dict[str, float] | None = None
        self.sync_sites: list[str] = []
        self.original = DeepseekV4Runner._run_chunks
        self.compiles = TritonCompileLog()  # Triton JIT compiles, filed under the chunk that paid them

    def __enter__(self) -> ChunkClock:
        original, clock = self.original, self
        self.compiles.__enter__()

        def timed(runner, scheduled):
            start, count = scheduled[0][0].num_computed_tokens, sum(count for _, count in scheduled)
            return clock.run(start, count, lambda: original(runner, scheduled))
        DeepseekV4Runner._run_chunks = timed
        return self

    def __exit__(self, *exc) -> None:
        DeepseekV4Runner._run_chunks = self.original
        self.compiles.__exit__(*exc)

    def run(self, start: int, count: int, chunk):
        if self.device.type == "cuda" and start == self.profile_start:
            return self._profiled(chunk)
        events, allocator = (self._event(), self._event()), AllocatorWatch(self.device)
        self.compiles.take()  # compiles between chunks (warm-up, decode) are not this chunk's
        self._record(events[0])
        host = time.perf_counter()
        try:
            return chunk()
        finally:
            host_ms = (time.perf_counter() - host) * 1e3
            self._record(events[1])
            watched = {**allocator.row(), **summarize(self.compiles.take())}
            self.chunks.append((start, count, *events, host_ms, watched))

    def _profiled(self, chunk):
        """Sections by CUDA events, and every operation that makes the host wait for the GPU
        (torch's sync debug mode: each one stalls the launch queue in the middle of a chunk)."""
        with SectionTimer(PAGED_SECTIONS) as timer, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = chunk()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.sections = timer.exclusive_ms()
        syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
        self.sections["host waits for the GPU (count)"] = len(syncs)
        self.sync_sites = sorted(set(syncs))[:10]
        return result

    def _event(self):
        return torch.cuda.Event(enable_timing=True) if self.device.type == "cuda" else None

    def _record(self, event) -> None:
        if event is not None:
            event.record()

    def summary(self) -> dict:
        """Per-chunk device and host ms of the chunks timed so far (then forgets them)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        device_ms = [start.elapsed_time(end) if start is not None else host for _, _, start, end, host, _ in self.chunks]
        result = {"chunk_starts": [c[0] for c in self.chunks], "chunk_device_ms": [round(ms, 2) for ms in device_ms],
                  "chunk_host_ms": [round(c[4], 2) for c in self.chunks], "chunks_device_s": sum(device_ms) / 1e3,
                  "chunk_allocator": [c[5] for c in self.chunks]}
        self.chunks.clear()
        return result


class DecodeOps:
    """The aten ops (model_shards/deepseek_v4/op_count.py) of one engine step in which each of
    `requests` requests decodes one token (DeepseekV4Runner._run_chunks: the step's preparation and
    its forward; sampling apart): all dispatched, those that compute (a kernel on a GPU), those
    inside the decoder layers, and the host syncs among them. Counts the `skip`-th such step."""

    def __init__(self, requests: int, skip: int = 2):
        self.requests, self.skip, self.counter = requests, skip, None
        self.seen = 0

    def __enter__(self) -> DecodeOps:
        original, watch = DeepseekV4Runner._run_chunks, self
        self.original = original

        def counted(runner, scheduled):
            decoding = len(scheduled) == watch.requests and all(count == 1 for _, count in scheduled)
            watch.seen += decoding
            if not decoding or watch.seen != watch.skip + 1:
                return original(runner, scheduled)
            with OpCounter(layers=runner.model.layers) as watch.counter:
                return original(runner, scheduled)
        DeepseekV4Runner._run_chunks = counted
        return self

    def __exit__(self, *exc) -> None:
        DeepseekV4Runner._run_chunks = self.original

    def row(self) -> dict:
        if self.counter is None:
            return {}
        step, layers = self.counter.step, self.counter.layers
        return {"decode_step_ops": step.total(), "decode_step_computing_ops": step.computing_total(),
                "decode_step_host_syncs": step.sync_total(), "decode_layers_ops": layers.total(),
                "decode_layers_computing_ops": layers.computing_total(), "decode_layers_host_syncs": layers.sync_total(),
                "decode_step_sync_ops": dict(step.syncs)}


def make_engine(folder: Path, args: argparse.Namespace, block_size: int, decode_graphs: bool = False) -> LLMEngine:
    """`decode_graphs`: decode-only steps of up to the most concurrent requests replay CUDA graphs (else eager).
    Prefill chunks keep their whole budget while others decode: with the default 2048 a step, 32
    requests of 4000 tokens never all decoded together (the first ones finished first)."""
    longest = max(args.lengths) + args.decode_steps + 2 * args.chunk_tokens
    most_requests = max([4, *args.concurrency])
    concurrent = most_requests * (args.concurrency_prompt_tokens + args.decode_steps + 2 * block_size)
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=str(folder), device=args.device, dtype=args.dtype,
                            cuda_graph_max_batch=most_requests if decode_graphs else 0,
                            deepseek_v4_chunk_attention=args.chunk_attention,
                            deepseek_v4_index_top_k=args.index_top_k),
        cache=CacheSettings(num_device_blocks=max(longest, concurrent) // block_size + 64),
        scheduler=SchedulerSettings(max_tokens_per_step=args.chunk_tokens, max_num_seqs=most_requests,
                                    max_tokens_per_step_while_decoding=args.chunk_tokens)))


def engine_timing(engine: LLMEngine, prompt: list[int], decode_steps: int, clock: ChunkClock) -> dict:
    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
    with clock:
        result = generate(engine, [prompt], params)[0][0]
    if result.error:
        raise RuntimeError(f"engine: {result.error}")
    prefill = [i for i, start in enumerate(c[0] for c in clock.chunks) if start < len(prompt)]
    chunks = clock.summary()
    prefill_device_s = sum(chunks["chunk_device_ms"][i] for i in prefill) / 1e3
    return {"prefill_s": result.ttft_s, "tokens_per_s": len(prompt) / result.ttft_s,
            "decode_ms_per_token": result.tpot_s * 1e3, "prefill_chunks_device_s": prefill_device_s,
            "prefill_chunk_device_ms": [chunks["chunk_device_ms"][i] for i in prefill],
            "prefill_chunk_host_ms": [chunks["chunk_host_ms"][i] for i in prefill],
            "prefill_chunk_allocator": [chunks["chunk_allocator"][i] for i in prefill]}


def concurrent_decode(engine: LLMEngine, args: argparse.Namespace, concurrency: int) -> dict:
    """`concurrency` requests prefilled, then decoding together: device ms of the engine steps whose
    one forward holds a decode token of each (sampling excluded), tokens/s from them, the median
    host time of those forwards (launch-bound when it exceeds the device time), and the requests'
    mean time per output token (the whole step; it includes the one step DecodeOps counts ops of,
    which is slow: session 11 saw 105 ms at 1 request against 24 at 8, use the medians)."""
    prompts = [random_prompt(args.concurrency_prompt_tokens + i) for i in range(concurrency)]  # no prefix hits
    params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
    clock, ops = ChunkClock(torch.device(args.device)), DecodeOps(concurrency)
    with clock, ops:  # ops counts one step, which the median of the timed steps leaves out
        results = [sequences[0] for sequences in generate(engine, prompts, params)]
    if errors := [result.error for result in results if result.error]:
        raise RuntimeError(f"engine: {errors[0]}")
    counts, timed = [chunk[1] for chunk in clock.chunks], clock.summary()
    decode_ms = sorted(ms for count, ms in zip(counts, timed["chunk_device_ms"]) if count == concurrency)
    host_ms = sorted(ms for count, ms in zip(counts, timed["chunk_host_ms"]) if count == concurrency)
    if not decode_ms:
        return {"concurrency": concurrency, "skipped": f"no step decoded all {concurrency} requests: steps of {counts}"}
    median_ms = decode_ms[len(decode_ms) // 2]
    return {"concurrency": concurrency, "prompt_tokens": args.concurrency_prompt_tokens,
            "decode_steps_timed": len(decode_ms), "decode_step_device_ms": median_ms,
            "decode_step_host_ms": host_ms[len(host_ms) // 2],
            "decode_tokens_per_s": concurrency * 1e3 / median_ms,
            "tpot_ms_mean": sum(result.tpot_s for result in results) / concurrency * 1e3, **ops.row()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def unpaged_timing(model: DeepseekV4ForCausalLM, prompt: list[int], args: argparse.Namespace,
                   clock: ChunkClock) -> dict:
    ids, state = torch.tensor(prompt, device=model.device), model.new_state()
    synchronize(model.device)
    start = time.perf_counter()
    for first in range(0, len(prompt), args.chunk_tokens):
        hidden = clock.run(first, min(args.chunk_tokens, len(prompt) - first),
                           lambda: model(ids[first:first + args.chunk_tokens], state))
    token = model.compute_logits(hidden[-1:]).argmax(-1)
    synchronize(model.device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.decode_steps):
        token = model.compute_logits(model(token, state)).argmax(-1)
    synchronize(model.device)
    decode_ms = (time.perf_counter() - start) / args.decode_steps * 1e3
    chunks = clock.summary()
    return {"prefill_s": prefill_s, "tokens_per_s": len(prompt) / prefill_s, "decode_ms_per_token": decode_ms,
            "prefill_chunks_device_s": chunks["chunks_device_s"], "prefill_chunk_device_ms": chunks["chunk_device_ms"],
            "prefill_chunk_host_ms": chunks["chunk_host_ms"], "prefill_chunk_allocator": chunks["chunk_allocator"]}


def kv_bytes(folder: Path) -> dict[str, float]:
    flash = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    layout = compressed_layout(flash, flash.kv_block_multiple, torch.bfloat16)
    benched = parse_deepseek_v4_config(json.loads((folder / "config.json").read_text()))
    return {"flash_43_layers_pages_bytes_per_token": layout.nbytes / flash.kv_block_multiple,
            "flash_43_layers_formula_bytes_per_token": kv_bytes_per_token(flash)["total"],
            "benched_model_formula_bytes_per_token": kv_bytes_per_token(benched)["total"]}


class Report:
    def __init__(self, args: argparse.Namespace, folder: Path):
        self.path = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "deepseek_v4_paged.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"preset": args.preset, "device": args.device, "layers": args.layers, "experts": args.experts,
                     "chunk_tokens": args.chunk_tokens, "threads": torch.get_num_threads(), "rows": [],
                     "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                     "chunk_attention": args.chunk_attention, "index_top_k": args.index_top_k, "profile": {}, "kv": kv_bytes(folder)}

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def warm_up(engine: LLMEngine, model: DeepseekV4ForCausalLM | None, args: argparse.Namespace) -> None:
    """Two chunks and two decode steps on each path: kernels compile before any timed prompt."""
    prompt = random_prompt(2 * args.chunk_tokens + 5)
    clock = ChunkClock(torch.device(args.device))
    engine_timing(engine, prompt, 2, clock)
    if model is not None:
        unpaged_timing(model, prompt, argparse.Namespace(**{**vars(args), "decode_steps": 2}), clock)


def measure_length(engine: LLMEngine, model: DeepseekV4ForCausalLM | None, args: argparse.Namespace,
                   length: int) -> dict:
    device, prompt = torch.device(args.device), random_prompt(length)
    row = {"length": length, "engine_paged": engine_timing(engine, prompt, args.decode_steps, ChunkClock(device))}
    if model is not None and length <= args.model_max_length:
        row["model_unpaged"] = unpaged_timing(model, prompt, args, ChunkClock(device))
        row["engine_over_model_prefill"] = row["engine_paged"]["prefill_s"] / row["model_unpaged"]["prefill_s"]
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


def profile_last_chunk(engine: LLMEngine, model: DeepseekV4ForCausalLM | None, args: argparse.Namespace) -> dict:
    """CUDA-event sections of the last chunk of a --profile-length prompt (not the timed one: the
    events would slow it), through the engine and on the model alone."""
    length, device = args.profile_length, torch.device(args.device)
    chunk_start = (length - 1) // args.chunk_tokens * args.chunk_tokens
    prompt = random_prompt(length + 1)  # another prompt: no prefix hit on the timed one
    result = {"length": length + 1, "chunk_start": chunk_start}
    clock = ChunkClock(device, chunk_start)
    engine_timing(engine, prompt, 1, clock)
    result["engine_sections_ms"], result["engine_sync_sites"] = clock.sections, clock.sync_sites
    if model is not None:
        clock = ChunkClock(device, chunk_start)
        unpaged_timing(model, prompt, argparse.Namespace(**{**vars(args), "decode_steps": 1}), clock)
        result["model_sections_ms"], result["model_sync_sites"] = clock.sections, clock.sync_sites
    return result


def device_is_cuda(args: argparse.Namespace) -> bool:
    return torch.device(args.device).type == "cuda"


def set_alloc_conf(alloc_conf: str | None) -> None:
    """PYTORCH_CUDA_ALLOC_CONF is read once, when CUDA starts: set it before (workers inherit it)."""
    if alloc_conf is None:
        return
    if torch.cuda.is_initialized():
        raise SystemExit("--alloc-conf: CUDA already started, the setting would not apply")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf


def main() -> None:
    args = parse_args()
    set_alloc_conf(args.alloc_conf)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder = make_folder(args)
    report = Report(args, folder)
    block_size = parse_deepseek_v4_config(json.loads((folder / "config.json").read_text())).kv_block_multiple
    engine = make_engine(folder, args, block_size)
    model = None
    if min(args.lengths) <= args.model_max_length:
        kernels = KernelChoices(args.chunk_attention, args.index_top_k)
        model = DeepseekV4ForCausalLM.from_folder(folder, device=args.device, kernels=kernels,
                                                  dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    try:
        warm_up(engine, model, args)
        report.data["setup_s"] = time.perf_counter() - started
        for length in args.lengths:
            if time.perf_counter() - started > args.time_budget_s:
                report.add_row({"length": length, "skipped": f"time budget {args.time_budget_s} s spent"})
                continue
            report.add_row(measure_length(engine, model, args, length))
            if length == args.profile_length and device_is_cuda(args):
                report.data["profile"] = profile_last_chunk(engine, model, args)
                report.write()
        for concurrency in args.concurrency:
            report.add_row({**concurrent_decode(engine, args, concurrency), "decode_graphs": False})
        if args.decode_graphs and args.concurrency:
            engine.shutdown()  # its pages go before the graphs' engine takes its own
            engine = None
            engine = make_engine(folder, args, block_size, decode_graphs=True)
            warm_up(engine, None, args)
            for concurrency in args.concurrency:
                report.add_row({**concurrent_decode(engine, args, concurrency), "decode_graphs": True})
    finally:
        if engine is not None:
            engine.shutdown()
    print(json.dumps({"profile": report.data["profile"], "kv": report.data["kv"]}, indent=1))


if __name__ == "__main__":
    main()
