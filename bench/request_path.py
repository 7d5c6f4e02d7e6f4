"""Where one served request's time to first token goes, stage by stage, in the replica process.

One request at a time through the replica's own layers in this process (LLMServer with the
engine where `serve.engine_loop` puts it, a child process on a GPU; the OpenAI API on uvicorn;
an aiohttp client, bodies encoded before the clock), with a clock mark at each stage the request
passes. The marks are this bench's own wrappers around the stages' functions (the product has
no tracing hooks); the engine's side (the pipe, its queue, the step) is one stage, from the
moment the replica has sent the request until its first deltas are back, with the engine's own
prefill step time beside it. Reports each stage's median over --requests (after --warmup).

    python bench/request_path.py                                   # tiny model, CPU
    python bench/request_path.py --preset llama3-8b-shape --layers 2 --block-size 64 \\
        --shared-prefix-len 32768                                  # the serve bench's shape, on a GPU

On the CPU machine (tiny model, engine in a child, 32K shared prefix + 256; session 20) the
stages outside the engine came to ~8 ms, the largest the API's body parse and checks (~3 ms)
and the replica's request preparation and send (~2.6 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from engine_steps import engine_counters, format_step_report, step_report
from serve_load import _free_port, http_session

# (stage, the mark that ends it), in the order a request passes them; each starts at the mark before.
STAGES = [
    ("HTTP request to the route", "body_parse_start"),
    ("body JSON parse", "body_parsed"),
    ("request model validation", "handler_entered"),
    ("prompt ids checked", "prompt_checked"),
    ("to the engine client", "submit_started"),
    ("request prepared and sent", "submitted"),
    ("engine: pipe, queue, step, back", "deltas_back"),
    ("to the replica's event loop", "loop_woken"),
    ("to the streamed response", "response_created"),
    ("first SSE event written", "first_body_sent"),
    ("HTTP to the client", "client_first_chunk"),
]


class Marks:
    """Clock marks of the request in flight (one at a time): name -> the first perf_counter."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.current.setdefault(name, time.perf_counter())

    def take(self) -> dict[str, float]:
        taken, self.current = self.current, {}
        return taken


@contextmanager
def wrapped(owner, name: str, before=None, after=None):
    """owner.name wrapped: `before(*args)` and `after()` around each call; restored on exit."""
    original = getattr(owner, name)
    before = before or (lambda *args: None)
    after = after or (lambda: None)
    if asyncio.iscoroutinefunction(original):
        async def wrapper(*args, **kwargs):
            before(*args)
            result = await original(*args, **kwargs)
            after()
            return result
    else:
        def wrapper(*args, **kwargs):
            before(*args)
            result = original(*args, **kwargs)
            after()
            return result
    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def install_marks(stack: ExitStack, marks: Marks) -> None:
    """The replica's stages, each marked where it ends (STAGES). An engine on a thread delivers
    through a method bound before these wrappers: its "deltas_back" mark is missing, and the
    table's engine stage runs on to the event loop's wake-up."""
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    from deployments import api, json_body, prompts
    from engine import async_engine, engine_process

    def at(name: str):
        return lambda *args: marks.mark(name)

    def on_submit(client, command: str, *args) -> None:
        if command == "add_request":
            marks.mark("submit_started")

    def after_submit() -> None:
        if "submit_started" in marks.current:
            marks.mark("submitted")

    def on_send(cycle, message: dict) -> None:
        if message.get("body"):
            marks.mark("first_body_sent")

    stack.enter_context(wrapped(json_body.FastJSONRequest, "json", at("body_parse_start"), at("body_parsed")))
    stack.enter_context(wrapped(api.OpenAIService, "completions", at("handler_entered")))
    stack.enter_context(wrapped(prompts.PromptBuilder, "completion", after=at("prompt_checked")))
    for client in (engine_process.ProcessEngine, async_engine.AsyncEngine):
        stack.enter_context(wrapped(client, "_submit", on_submit, after_submit))
    stack.enter_context(wrapped(async_engine.EngineClient, "_dispatch", at("deltas_back")))
    stack.enter_context(wrapped(async_engine, "_wake_all", at("loop_woken")))
    stack.enter_context(wrapped(api, "_events", at("response_created")))  # made once the first deltas are in
    stack.enter_context(wrapped(httptools_impl.RequestResponseCycle, "send", on_send))


async def run(config, prompts: list[list[int]], warmup: int, output_len: int) -> tuple[list[dict], str]:
    """Each request's marks (after `warmup`), and the engine's steps over those requests."""
    import uvicorn

    from deployments.ingress import http_app, served_model_name
    from deployments.llm_server import LLMServer
    from deployments.local_backend import LocalBackend

    server, marks, port = LLMServer(config), Marks(), _free_port()
    app = http_app(LocalBackend(server), config)
    http_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(http_server.serve())
    traces = []
    try:
        while not http_server.started:
            await asyncio.sleep(0.01)
        with ExitStack() as stack:
            install_marks(stack, marks)
            async with http_session(4) as client:
                for index, prompt in enumerate(prompts):
                    if index == warmup:
                        counters, measured_from = engine_counters(await server.engine.metrics_exposition()), time.perf_counter()
                    body = json.dumps({"model": served_model_name(config), "prompt": prompt, "max_tokens": output_len,
                                       "temperature": 0.0, "ignore_eos": True, "stream": True}).encode()
                    marks.take()
                    start = time.perf_counter()
                    await _first_chunk(client, f"http://127.0.0.1:{port}/v1/completions", body, marks)
                    if index >= warmup:
                        traces.append({"start": start, **marks.take()})
        after = engine_counters(await server.engine.metrics_exposition())
        return traces, format_step_report(step_report(counters, after, time.perf_counter() - measured_from))
    finally:
        http_server.should_exit = True
        await serving
        server.engine.shutdown()


async def _first_chunk(client, url: str, body: bytes, marks: Marks) -> None:
    async with client.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for line in response.content:
            if line.startswith(b"data: {"):
                marks.mark("client_first_chunk")


def stage_table(traces: list[dict]) -> list[dict]:
    """Per stage: median and min ms over the requests that passed both of its marks."""
    rows, previous = [], "start"
    for stage, mark in STAGES:
        spans = [(trace[mark] - trace[previous]) * 1e3 for trace in traces if mark in trace and previous in trace]
        if spans:
            rows.append({"stage": stage, "median_ms": round(statistics.median(spans), 3),
                         "min_ms": round(min(spans), 3), "requests": len(spans)})
            previous = mark
    total = [(trace["client_first_chunk"] - trace["start"]) * 1e3 for trace in traces if "client_first_chunk" in trace]
    rows.append({"stage": "TTFT as the client sees it", "median_ms": round(statistics.median(total), 3),
                 "min_ms": round(min(total), 3), "requests": len(total)})
    return rows


def _config(args, model_dir: str):
    from cluster.config import CacheSettings, KVTierSettings, LongctxConfig, ModelSettings, ServeSettings

    serve = {} if args.engine_loop is None else {"engine_loop": args.engine_loop}
    return LongctxConfig(model=ModelSettings(path=model_dir),
                         cache=CacheSettings(block_size=args.block_size, num_device_blocks=args.num_kv_blocks),
                         kv_tiers=KVTierSettings(host_bytes=args.host_kv_bytes, redis_urls=tuple(args.redis_url)),
                         serve=ServeSettings(**serve))  # fmt: skip


def _model_dir(args) -> str:
    from model_shards.make_model import PRESETS, make_model

    needed = args.shared_prefix_len + args.input_len + args.output_len
    overrides = {"max_position_embeddings": max(PRESETS[args.preset].max_position_embeddings, needed)}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    return str(make_model(Path(tempfile.mkdtemp(prefix="longctx-bench-")) / args.preset, args.preset, **overrides))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--shared-prefix-len", type=int, default=32768, help="tokens every prompt starts with")
    parser.add_argument("--input-len", type=int, default=256, help="each prompt's own tokens after the prefix")
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="requests first, not counted (the prefix's prefill)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=8192)
    parser.add_argument("--host-kv-bytes", type=int, default=0, help="host KV tier (needed by --redis-url)")
    parser.add_argument("--redis-url", action="append", default=[], help="Redis KV tier (repeatable)")
    parser.add_argument("--engine-loop", choices=("auto", "thread", "process"), default=None,
                        help="serve.engine_loop (default: the config's, auto: a child process on a GPU)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "request_path.json"))
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    model_dir = _model_dir(args)
    from model_folder.hf_config import load_architecture

    vocab = load_architecture(model_dir).vocab_size
    rng = random.Random(0)
    prefix = rng.choices(range(100, vocab), k=args.shared_prefix_len)
    prompts = [prefix + rng.choices(range(100, vocab), k=args.input_len) for _ in range(args.warmup + args.requests)]
    traces, summary = asyncio.run(run(_config(args, model_dir), prompts, args.warmup, args.output_len))
    rows = stage_table(traces)
    print(f"\n{'stage':<34}{'median ms':>10}{'min ms':>9}")
    for row in rows:
        print(f"{row['stage']:<34}{row['median_ms']:>10.3f}{row['min_ms']:>9.3f}")
    print(summary)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "stages": rows, "engine": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
