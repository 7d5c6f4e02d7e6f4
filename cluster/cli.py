"""The `longctx` command line: make-model, generate, serve, dashboards, autoscale.

Contract (scripts depend on it): `longctx generate --json` prints one JSON object with `text`,
`token_ids`, `usage` {prompt_tokens, completion_tokens}, `timing` {ttft_s, tpot_s} and `kv`
{block_size, blocks_used, prefix_hit_tokens, device_hit_tokens, host_hit_tokens, redis_hit_tokens,
computed_prefill_tokens}. Errors print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cluster.arguments import (
    add_engine_arguments,
    add_sampling_arguments,
    add_serve_arguments,
    build_config,
    split_urls,
)
from cluster.config import ConfigError, LongctxConfig

EXIT_USAGE = 2
_split_urls = split_urls  # the name tests and older scripts import


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"longctx {version('longctx')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "longctx (not installed)"


def _parser() -> argparse.ArgumentParser:
    from model_shards.make_model import add_make_model_arguments

    parser = argparse.ArgumentParser(prog="longctx", description="Exact long-context LLM serving.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    make_model = commands.add_parser("make-model", help="write a Hugging Face model folder with random weights")
    add_make_model_arguments(make_model)
    generate = commands.add_parser("generate", help="generate from one prompt")
    add_engine_arguments(generate)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-file")
    add_sampling_arguments(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_argument("--quiet", action="store_true", help="no progress on stderr")
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    add_engine_arguments(serve)
    add_serve_arguments(serve)
    from dashboards.cli import add_dashboards_parser

    add_dashboards_parser(commands)
    _add_autoscale_command(commands)
    return parser


def _add_autoscale_command(commands) -> None:
    from autoscaler.simulator.cli import add_autoscale_arguments

    autoscale = commands.add_parser("autoscale", help="simulate autoscaling policies on request traces")
    add_autoscale_arguments(autoscale)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror}") from None


def run_generate(args: argparse.Namespace) -> int:
    from cluster.progress_line import ProgressLine
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    config = build_config(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed)  # fmt: skip
    prompt = _read_prompt(args)
    progress = None if args.quiet else ProgressLine(sys.stderr)
    engine = LLMEngine(config)  # with --tp / --sp: one local process per rank
    try:
        result = generate(engine, [prompt], params, on_progress=progress)[0][0]
    finally:
        engine.shutdown()
    block_size = engine.block_size  # resolved for the model (cluster/config.py)
    if progress is not None:
        progress.done()
    if result.error is not None:
        print(f"longctx: error: {result.error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_generation_json(result, block_size)))
    else:
        print(result.text)
    return 0


def _generation_json(result, block_size: int) -> dict[str, Any]:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": len(result.token_ids)},
        "timing": {"ttft_s": result.ttft_s, "tpot_s": result.tpot_s},
        "kv": {
            "block_size": block_size,
            "blocks_used": result.num_kv_blocks,
            "prefix_hit_tokens": result.num_prefix_hit_tokens,
            "device_hit_tokens": (
                result.num_prefix_hit_tokens - result.num_host_hit_tokens - result.num_redis_hit_tokens
            ),
            "host_hit_tokens": result.num_host_hit_tokens,
            "redis_hit_tokens": result.num_redis_hit_tokens,
            "computed_prefill_tokens": result.num_prompt_tokens - result.num_prefix_hit_tokens,
        },
    }


def run_serve(args: argparse.Namespace) -> int:
    from cluster.serve import serve_foreground

    return serve_foreground(build_config(args), host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-model":
            from model_shards.make_model import run_make_model

            run_make_model(args)
            return 0
        if args.command == "dashboards":
            from dashboards.cli import run_dashboards

            return run_dashboards(args)
        if args.command == "autoscale":
            from autoscaler.simulator.cli import run_autoscale

            return run_autoscale(args)
        return run_generate(args) if args.command == "generate" else run_serve(args)
    except (ValueError, OSError) as error:  # config, model folder and parameter errors
        print(f"longctx: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
