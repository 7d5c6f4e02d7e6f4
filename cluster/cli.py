"""The `longctx` command line: make-model, generate, serve.

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

from cluster.config import (
    CacheSettings,
    ConfigError,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
    load_config,
)

EXIT_USAGE = 2


def _default(settings_class, name: str) -> Any:
    return settings_class.model_fields[name].default


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and serve; defaults come from the config classes."""
    parser.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    parser.add_argument("--model", help="Hugging Face model folder")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help=f"default: {_default(ModelSettings, 'dtype')}")
    parser.add_argument("--device", default=None, help=f"default: {_default(ModelSettings, 'device')}")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"tokens per KV block (default {_default(CacheSettings, 'block_size')})")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-tokens-per-step", type=int, default=None,
                        help=f"chunked-prefill budget (default {_default(SchedulerSettings, 'max_tokens_per_step')})")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallel ranks: heads split over N GPUs (default 1)")
    parser.add_argument("--sp", type=int, default=None, metavar="N",
                        help="sequence parallel ranks: long prompts and their KV split over N GPUs (default 1)")
    parser.add_argument("--span-nodes", action="store_true", default=None,
                        help="serve with Ray actors: TP groups stay inside a node, SP ranks may cross nodes")
    parser.add_argument("--kv-host-bytes", type=int, default=None,
                        help="host-memory KV tier per worker, in bytes (default 0: off)")
    parser.add_argument("--kv-redis-url", action="append", default=None, metavar="URL",
                        help="Redis KV tier shared by replicas: redis://, rediss://, redis+sentinel:// or "
                             "redis+cluster:// URL; repeat or comma-separate to shard (needs --kv-host-bytes)")


def build_config(args: argparse.Namespace) -> LongctxConfig:
    overrides = {
        "model.path": args.model,
        "model.dtype": args.dtype,
        "model.device": args.device,
        "model.max_model_len": args.max_model_len,
        "cache.block_size": args.block_size,
        "cache.num_device_blocks": args.num_kv_blocks,
        "cache.enable_prefix_caching": False if args.no_prefix_caching else None,
        "scheduler.max_tokens_per_step": args.max_tokens_per_step,
        "parallel.tensor_parallel_size": args.tp,
        "parallel.sequence_parallel_size": args.sp,
        "parallel.span_nodes": args.span_nodes,
        "kv_tiers.host_bytes": args.kv_host_bytes,
        "kv_tiers.redis_urls": _split_urls(args.kv_redis_url),
    }
    config = load_config(args.config).with_overrides(overrides)
    if not config.model.path:
        raise ConfigError("no model: pass --model DIR or set model.path in the config file")
    return config


def _split_urls(values: list[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    urls: list[str] = []
    for value in values:
        first = len(urls)
        for piece in filter(None, (piece.strip() for piece in value.split(","))):
            if "://" in piece or len(urls) == first:
                urls.append(piece)
            else:  # a further host of redis+sentinel://h1,h2/... or redis+cluster://h1,h2
                urls[-1] += "," + piece
    return tuple(urls)


def _parser() -> argparse.ArgumentParser:
    from model_shards.make_model import add_make_model_arguments

    parser = argparse.ArgumentParser(prog="longctx", description="Exact long-context LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    make_model = commands.add_parser("make-model", help="write a Hugging Face model folder with random weights")
    add_make_model_arguments(make_model)
    generate = commands.add_parser("generate", help="generate from one prompt")
    _add_engine_arguments(generate)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-file")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    _add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    return parser


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror}") from None


def run_generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    config = build_config(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompt = _read_prompt(args)
    engine = LLMEngine(config)  # with --tp / --sp: one local process per rank
    try:
        result = generate(engine, [prompt], params)[0][0]
    finally:
        engine.shutdown()
    if args.json:
        print(json.dumps(_generation_json(result, config)))
    else:
        print(result.text)
    return 0


def _generation_json(result, config: LongctxConfig) -> dict[str, Any]:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": len(result.token_ids)},
        "timing": {"ttft_s": result.ttft_s, "tpot_s": result.tpot_s},
        "kv": {
            "block_size": config.cache.block_size,
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
        return run_generate(args) if args.command == "generate" else run_serve(args)
    except (ValueError, OSError) as error:  # config, model folder and parameter errors
        print(f"longctx: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
