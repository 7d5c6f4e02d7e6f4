"""Where the serving overhead goes: the same requests through one more layer at a time.

Each row adds one layer to the row above it, on the same model in the same run, so the
difference between two rows is that layer's cost (TTFT and TPOT, mean, one request at a time;
output tokens/s at --concurrency):

    engine_thread   the engine loop on a thread of this process (what bench/serve_load.py calls `direct`)
    engine          the engine as a replica builds it (serve.engine_loop auto: a child process on a
                      GPU, so this row less the one above is the process hop; on a CPU the same thread)
    llm_server      + the replica's LLMServer.generate (admission, one list per step)
    http            + the OpenAI API (FastAPI, JSON, server-sent events) over real HTTP, uvicorn
                      in this process: no Ray
    serve_direct    + Ray Serve, direct ingress: the LLM server replica serving HTTP itself on its
                      own port (deployments/app.py direct_ingress_env), model worker inside it
    serve_fused     + Serve's proxy in front of it (the default application of one replica)
    serve_split     + one more Serve hop: proxy -> OpenAIIngress -> router -> LLM server replica
    serve_split_ray + the step's trip to the model worker as a Ray actor (session 4's layout)

    python bench/serve_overhead.py                  # tiny model made in a temp folder, ~3 min on 2 cores
    python bench/serve_overhead.py --preset llama3-8b-shape --layers 2 --shared-prefix-len 32768 --block-size 64
    # on a GPU, the serve bench's shape with its KV tiers: bench/gpu_open_figures.sh stage `overhead`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

from serve_load import (
    Sender,
    Workload,
    _free_port,
    _run_all,
    bench_config,
    direct_sender,
    http_sender,
    http_session,
    make_workload,
    run_served,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "serve_overhead.json"
SERVED_ROWS = {"serve_direct": "fused_direct", "serve_fused": "fused_local", "serve_split": "split_local",
               "serve_split_ray": "split_ray"}


def llm_server_sender(server) -> Sender:
    """LLMServer.generate in this process, as a replica runs it (its lists of deltas)."""
    from deployments.messages import GenerateRequest, ServeError
    from protocol.sampling_params import SamplingParams

    counter = iter(range(1 << 62))

    async def send(prompt: list[int], output_len: int, record) -> None:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        async for reply in server.generate(GenerateRequest(f"bench-{next(counter)}", prompt, params)):
            if isinstance(reply, ServeError):
                raise RuntimeError(reply.message)
            now = time.perf_counter()
            record.token_times.extend(now for delta in reply for _ in delta.token_ids)

    return send


async def run_in_process(config, workloads: list[Workload], slo) -> dict[str, dict[str, dict]]:
    """engine_thread, engine, llm_server and http: one layer added at a time, in this process."""
    import torch

    # A replica's torch runs on as many threads as the CPUs it reserves (Ray sets OMP_NUM_THREADS).
    torch.set_num_threads(max(1, int(config.serve.worker_num_cpus)))
    rows = {"engine_thread": await _run_engine_thread(config, workloads, slo)}
    rows.update(await _run_replica_layers(config, workloads, slo))
    return rows


async def _run_engine_thread(config, workloads: list[Workload], slo) -> dict[str, dict]:
    """The engine loop on a thread of this process, as serve_load's `direct` drives it."""
    from engine.serving import serving_engine

    engine = serving_engine(config.with_overrides({"serve.engine_loop": "thread"}))
    try:
        await _run_all(direct_sender(engine), workloads[:1], slo)  # warm: no row has a head start
        return await _run_all(direct_sender(engine), workloads, slo)
    finally:
        engine.shutdown()


async def _run_replica_layers(config, workloads: list[Workload], slo) -> dict[str, dict[str, dict]]:
    """engine, llm_server and http: the replica's own engine, then its layers one at a time."""
    import uvicorn

    from deployments.ingress import http_app, served_model_name
    from deployments.llm_server import LLMServer
    from deployments.local_backend import LocalBackend

    server = LLMServer(config)
    await _run_all(direct_sender(server.engine), workloads[:1], slo)
    rows = {"engine": await _run_all(direct_sender(server.engine), workloads, slo)}
    rows["llm_server"] = await _run_all(llm_server_sender(server), workloads, slo)
    port = _free_port()
    uvicorn_config = uvicorn.Config(http_app(LocalBackend(server), config), host="127.0.0.1", port=port,
                                    log_level="warning", lifespan="off")  # fmt: skip
    http_server = uvicorn.Server(uvicorn_config)
    serving = asyncio.create_task(http_server.serve())
    try:
        while not http_server.started:
            await asyncio.sleep(0.01)
        async with http_session(workloads[-1].max_concurrency + 8) as client:
            send = http_sender(client, f"http://127.0.0.1:{port}", served_model_name(config))
            rows["http"] = await _run_all(send, workloads, slo)
    finally:
        http_server.should_exit = True
        await serving
        server.engine.shutdown()
    return rows


def _model_dir(args) -> str:
    """--model, or --preset made in a temp folder, its context stretched to hold the prompts."""
    if args.model:
        return args.model
    from model_shards.make_model import PRESETS, make_model

    needed = args.shared_prefix_len + args.input_len + args.output_len
    overrides = {"max_position_embeddings": max(PRESETS[args.preset].max_position_embeddings, needed)}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    return str(make_model(Path(tempfile.mkdtemp(prefix="longctx-bench-")) / args.preset, args.preset, **overrides))


def print_breakdown(rows: dict[str, dict[str, dict]], load_name: str) -> None:
    """One line per layer: its figures and what it adds to the layer above."""
    print(f"\n{'layer':<17}{'TTFT ms':>9}{'+ms':>8}{'TPOT ms':>9}{'+ms':>8}{'ITL p50':>9}"
          f"{load_name + ' tok/s':>17}{'vs row 1':>11}")  # fmt: skip
    first = next(iter(rows))
    previous, engine_rate = None, rows[first][load_name]["output_throughput_tok_per_s"]
    for layer, summaries in rows.items():
        single, load = summaries["overhead"], summaries[load_name]
        ttft, tpot = single["ttft_ms"]["mean"], single["tpot_ms"]["mean"]
        added_ttft = ttft - previous["ttft_ms"]["mean"] if previous else 0.0
        added_tpot = tpot - previous["tpot_ms"]["mean"] if previous else 0.0
        rate = load["output_throughput_tok_per_s"]
        print(f"{layer:<17}{ttft:>9.2f}{added_ttft:>+8.2f}{tpot:>9.3f}{added_tpot:>+8.3f}{single['itl_ms']['p50']:>9.2f}"
              f"{rate:>17.1f}{(rate / max(engine_rate, 1e-9) - 1) * 100:>+10.1f}%")  # fmt: skip
        previous = single


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: make --preset in a temp folder)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--shared-prefix-len", type=int, default=0)
    parser.add_argument("--requests", type=int, default=16, help="one-at-a-time requests per layer")
    parser.add_argument("--concurrency", type=int, default=16, help="streams at once of the load row")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=4096, help="0: sized from device memory")
    parser.add_argument("--stream-chunks-per-s", type=float, default=None,
                        help="serve.stream_chunks_per_s of the replicas (default: the config's)")
    parser.add_argument("--host-kv-bytes", type=int, default=0, help="host KV tier (needed by --redis-url)")
    parser.add_argument("--redis-url", action="append", default=[], help="Redis KV tier (repeatable)")
    parser.add_argument("--engine-loop", choices=("auto", "thread", "process"), default=None,
                        help="serve.engine_loop of the replica layers (default: the config's, auto)")
    parser.add_argument("--layers-to-run", nargs="+", default=["in_process", *SERVED_ROWS],
                        choices=["in_process", *SERVED_ROWS])
    parser.add_argument("--out", default=str(RESULTS_PATH))
    args = parser.parse_args()
    # bench_config reads serve_load's flags; this is the one the breakdown keeps fixed.
    args.num_prompts = 2 * args.concurrency
    return args


def main() -> None:
    args = _parse_args()
    model_dir = _model_dir(args)
    config = bench_config(argparse.Namespace(**{**vars(args), "concurrency": [args.concurrency]}), model_dir)
    if args.engine_loop:
        config = config.with_overrides({"serve.engine_loop": args.engine_loop})
    from model_folder.hf_config import load_architecture

    vocab = load_architecture(model_dir).vocab_size
    prefix = random.Random(-1).choices(range(100, vocab), k=args.shared_prefix_len)
    common = (args.input_len, args.output_len)
    load_name = f"load_c{args.concurrency}"
    workloads = [make_workload("overhead", args.requests, *common, float("inf"), 1, vocab, 0, prefix),
                 make_workload(load_name, args.num_prompts, *common, float("inf"), args.concurrency, vocab, 1, prefix)]
    slo = (10.0, 1.0)
    rows: dict[str, dict[str, dict]] = {}
    if "in_process" in args.layers_to_run:
        rows.update(asyncio.run(run_in_process(config, workloads, slo)))
    for layer, path in SERVED_ROWS.items():
        if layer in args.layers_to_run:
            rows[layer] = run_served(config, path, workloads, slo)
            print(f"{layer}: TTFT {rows[layer]['overhead']['ttft_ms']['mean']} ms, "
                  f"TPOT {rows[layer]['overhead']['tpot_ms']['mean']} ms", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]},
              "args": vars(args), "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for layer, summaries in rows.items():
        for name, summary in summaries.items():
            if summary["failed"]:
                print(f"{layer} {name}: {summary['failed']} failed: {summary['errors']}")
    if rows:
        print_breakdown(rows, load_name)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
