"""Where the served path spends its CPU: py-spy on the Serve proxy and the LLM server replica
while bench/serve_load.py's streams run through them, at each of --levels streams at once.

For each process and load it writes the collapsed stacks (`py-spy record --format raw --gil`) and
prints the CPU each process spends a request (/proc) and the GIL-holding time a request per stage of
the request path (STAGES: the first pattern found in a stack, innermost frame first, names its
stage). Needs py-spy (`pip install py-spy`) and ptrace rights.

    python bench/serve_profile.py                       # tiny model, fused_local, 1 and 16 streams, 1 and 64 out
    python bench/serve_profile.py --served fused_direct --levels 1 --stream-chunks-per-s 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import SERVED_PATHS, bench_config, http_sender, http_session, make_workload, run_workload, start_served, stop_served

SAMPLE_RATE = 250  # py-spy samples a second

# (stage, substrings of a frame): the innermost frame that matches one names the sample's stage.
STAGES = [
    ("engine step (torch)", ("llm_engine.py", "model_shards/", "torch/")),
    ("detokenize", ("detokenizer.py", "tokenizers")),
    ("tokenize / chat template", ("prompts.py", "jinja2")),
    ("request body parse (pydantic)", ("pydantic", "openai_api.py", "fastapi/_compat", "fastapi/dependencies")),
    ("SSE chunk JSON", ("responses.py", "json/", "_event (deployments/api.py")),
    ("engine -> stream queues", ("async_engine.py",)),
    ("app per chunk (api.py, generation.py)", ("api.py", "generation.py", "batched_prompts.py", "llm_server.py")),
    ("ASGI / starlette / uvicorn", ("starlette", "uvicorn", "fastapi", "h11", "httptools")),
    ("Serve replica (ASGI messages -> stream)", ("serve/_private/replica.py", "serve/_private/http_util.py",
                                                 "serve/_private/replica_result.py")),
    ("Serve proxy (route, HTTP, stream)", ("serve/_private/proxy", "serve/_private/router", "serve/_private/request_router",
                                           "serve/_private/replica_result", "serve/handle.py")),
    ("Ray core (actor calls, streaming)", ("ray/_private", "_raylet", "ray/actor.py", "ray/_raylet")),
    ("asyncio loop", ("asyncio/",)),
    ("metrics / logging", ("prometheus_client", "logging/", "serve/_private/metrics", "ray/util/metrics")),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for stage, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return stage
    return "other"


def shares(raw_path: Path) -> tuple[dict[str, float], int]:
    """Collapsed stacks -> share of samples per stage, and the sample count."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[stage_of(stack)] += int(count)
    total = sum(counts.values())
    return {stage: counts[stage] / max(total, 1) for stage, _ in [*STAGES, ("other", ())]}, total


def thread_shares(raw_path: Path, top: int = 6) -> dict[str, float]:
    """Collapsed stacks recorded with --threads -> share of samples per thread (GIL-holding
    samples, with --gil), named by py-spy's thread frame: its id and name."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread = stack.split(";")[0]
        if thread.startswith("thread"):
            counts[thread[:80]] += int(count)
    total = sum(counts.values())
    return {thread: count / max(total, 1) for thread, count in counts.most_common(top)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _py_spy() -> str:
    """py-spy beside this Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def process_ids() -> dict[str, int]:
    """The proxy's and the replicas' pids, from their process titles (Ray's `ray::<Actor>`), and
    the LLM server's engine process (`serve.engine_loop: process`: its spawned child) as EngineChild."""
    listing = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    found, parents = {}, {}
    for line in listing.splitlines()[1:]:
        pid, ppid, title = line.split(maxsplit=2)
        parents[int(pid)] = (int(ppid), title)
        for name in ("ProxyActor", "ServeReplica:bench:LLMServer", "ServeReplica:bench:OpenAIIngress"):
            if title.startswith(f"ray::{name}"):
                found[name.split(":")[-1]] = int(pid)
    for pid, (ppid, title) in parents.items():
        if ppid == found.get("LLMServer") and "spawn_main" in title:
            found["EngineChild"] = pid
    return found


async def profile_load(url: str, model: str, workload, seconds: float, out: Path, pids: dict[str, int]) -> dict:
    recorders = {name: subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                         "--rate", str(SAMPLE_RATE), "--format", "raw", "--nonblocking", "--gil", "--threads",
                                         "--output", str(out / f"{workload.name}-{name}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name, pid in pids.items()}  # fmt: skip
    started, requests, cpu_before = time.monotonic(), 0, {name: cpu_seconds(pid) for name, pid in pids.items()}
    async with http_session(workload.max_concurrency + 8) as client:
        send = http_sender(client, url, model)
        while time.monotonic() - started < seconds:
            records, _ = await run_workload(send, workload)
            requests += len(records)
    for recorder in recorders.values():
        recorder.wait()
    elapsed = time.monotonic() - started
    report = {"requests_per_s": requests / elapsed}
    for name, pid in pids.items():
        stage_shares, samples = shares(out / f"{workload.name}-{name}.txt")
        cpu_ms = (cpu_seconds(pid) - cpu_before[name]) * 1e3
        gil_ms = samples / SAMPLE_RATE * 1e3 / requests  # the recorders ran for `seconds` of `elapsed`
        report[name] = {"cpu_ms_per_request": cpu_ms / requests, "cpu_cores": cpu_ms / 1e3 / elapsed,
                        "gil_ms_per_request": gil_ms * elapsed / seconds,
                        "stage_gil_ms_per_request": {stage: share * gil_ms * elapsed / seconds
                                                     for stage, share in stage_shares.items()},
                        "thread_gil_ms_per_request": {thread: share * gil_ms * elapsed / seconds for thread, share
                                                      in thread_shares(out / f"{workload.name}-{name}.txt").items()}}
    return report


def print_report(reports: dict[str, dict]) -> None:
    for load, report in reports.items():
        print(f"\n{load}: {report['requests_per_s']:.1f} requests/s")
        for name, figures in report.items():
            if not isinstance(figures, dict):
                continue
            print(f"  {name}: {figures['cpu_ms_per_request']:.2f} CPU ms a request ({figures['cpu_cores']:.2f} cores), "
                  f"GIL held {figures['gil_ms_per_request']:.2f} ms a request, by stage:")
            for stage, ms in sorted(figures["stage_gil_ms_per_request"].items(), key=lambda item: -item[1]):
                if ms >= 0.01:
                    print(f"    {ms:7.2f} ms  {stage}")
            print("   by thread:")
            for thread, ms in figures["thread_gil_ms_per_request"].items():
                print(f"    {ms:7.2f} ms  {thread}")


def _model_and_prompt(args) -> tuple[str, dict]:
    """The model folder (made here) and the prompts' shape; sets the cache and tier arguments."""
    from model_shards.make_model import make_model

    folder = Path(tempfile.mkdtemp(prefix="longctx-bench-"))
    if not args.serve_bench_shape:
        args.block_size, args.num_kv_blocks, args.host_kv_bytes = 16, 4096, 0
        return str(make_model(folder / "tiny", "tiny")), {"input_len": 256, "vocab_size": 512, "shared_prefix": []}
    args.block_size, args.num_kv_blocks, args.host_kv_bytes = 64, 0, 8 << 30
    model_dir = str(make_model(folder / "8b", "llama3-8b-shape", num_hidden_layers=2))
    shared_prefix = [random.Random(0).randrange(100, 128256) for _ in range(32768)]
    return model_dir, {"input_len": 256, "vocab_size": 128256, "shared_prefix": shared_prefix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--served", default="fused_local", choices=sorted(SERVED_PATHS))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16], help="streams at once")
    parser.add_argument("--output-lens", type=int, nargs="+", default=[1, 64],
                        help="tokens out; 1 against 64 separates the per-request from the per-chunk cost")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--stream-chunks-per-s", type=float, default=None)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="longctx-serve-profile-"))
    parser.add_argument("--serve-bench-shape", action="store_true",
                        help="bench/gpu_serve.sh's load instead of a tiny model: the 8B shape with 2 layers, 32K "
                             "shared prefix + 256 new tokens a prompt, host tier (8 GiB) and --redis-url")
    parser.add_argument("--redis-url", action="append", default=[])
    args = parser.parse_args()
    model_dir, prompt = _model_and_prompt(args)
    args.num_prompts, args.concurrency = 2 * max(args.levels), args.levels
    config = bench_config(args, model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url, model = start_served(config.with_overrides(SERVED_PATHS[args.served]), direct_ingress=args.served.startswith("fused_direct"))
    try:
        pids = process_ids()
        print(f"profiling {pids}; stacks in {out}", flush=True)
        reports = {}
        for streams in args.levels:
            for output_len in args.output_lens:
                workload = make_workload(f"c{streams}-out{output_len}", 2 * streams, prompt["input_len"], output_len,
                                         float("inf"), streams, prompt["vocab_size"], streams, prompt["shared_prefix"])
                reports[workload.name] = asyncio.run(profile_load(url, model, workload, args.seconds, out, pids))
    finally:
        stop_served()
    (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    print_report(reports)


if __name__ == "__main__":
    random.seed(0)
    main()
