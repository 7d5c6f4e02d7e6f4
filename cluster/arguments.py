"""The command line's options and how they override the config: flags named as vLLM names
them where vLLM has one (--served-model-name, --api-key, --max-num-seqs, ...). Defaults come
from the config classes; a flag left out leaves the config file's value alone.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

from cluster.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_REDIS_STAGING_BYTES,
    ConfigError,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
    ServeSettings,
    load_config,
)

_BYTES = TypeAdapter(ByteSize)


def byte_size(text: str) -> int:
    """argparse type: `1073741824`, `64MiB`, `1GiB`, `512MB`."""
    try:
        return int(_BYTES.validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is no byte size (examples: 1073741824, 64MiB, 1GiB)") from None


def _default(settings_class, name: str) -> Any:
    return settings_class.model_fields[name].default


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and serve."""
    parser.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    parser.add_argument("--model", help="Hugging Face model folder")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help=f"default: {_default(ModelSettings, 'dtype')}")
    parser.add_argument("--device", default=None, help=f"default: {_default(ModelSettings, 'device')}")
    parser.add_argument("--quantized-weights", choices=["dequantize", "keep"], default=None,
                        help=f"DeepSeek-V4 FP8/FP4 weights (default {_default(ModelSettings, 'quantized_weights')})")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"tokens per KV block (default {DEFAULT_BLOCK_SIZE}; DeepSeek-V4: the lcm of its compress rates)")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-tokens-per-step", type=int, default=None,
                        help=f"chunked-prefill budget (default {_default(SchedulerSettings, 'max_tokens_per_step')})")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help=f"most sequences running at once (default {_default(SchedulerSettings, 'max_num_seqs')})")
    parser.add_argument("--no-prefix-caching", action="store_true")
    _add_parallel_arguments(parser)
    _add_tier_arguments(parser)


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=None, metavar="N",
                        help="tensor parallel ranks: heads split over N GPUs (default 1)")
    parser.add_argument("--sp", "--sequence-parallel-size", dest="sp", type=int, default=None, metavar="N",
                        help="sequence parallel ranks: long prompts split over N GPUs, dense models their KV too (default 1)")
    parser.add_argument("--executor", choices=["auto", "local", "ray"], default=None,
                        help="where the ranks run: local processes or Ray actors (default auto)")
    parser.add_argument("--span-nodes", action="store_true", default=None,
                        help="serve with Ray actors: TP groups stay inside a node, SP ranks may cross nodes")


def _add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-host-bytes", type=byte_size, default=None, metavar="SIZE",
                        help="host-memory KV tier per worker: bytes or 64MiB, 1GiB ... (default 0: off; "
                             "1GiB with --kv-redis-url)")
    parser.add_argument("--kv-redis-url", action="append", default=None, metavar="URL",
                        help="Redis KV tier shared by replicas: redis://, rediss://, redis+sentinel:// or "
                             "redis+cluster:// URL; repeat or comma-separate to shard")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model id in /v1/models and responses (default: the folder's name)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/*")
    parser.add_argument("--num-replicas", type=int, default=None,
                        help=f"LLM server replicas (default {_default(ServeSettings, 'num_replicas')})")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string; repeat for more")
    parser.add_argument("--seed", type=int, default=None)


def build_config(args: argparse.Namespace) -> LongctxConfig:
    base = load_config(args.config)
    config = base.with_overrides(_overrides(args, base))
    if not config.model.path:
        raise ConfigError("no model: pass --model DIR or set model.path in the config file")
    return config


def _overrides(args: argparse.Namespace, base: LongctxConfig) -> dict[str, Any]:
    overrides = {
        "model.path": args.model,
        "model.dtype": args.dtype,
        "model.device": args.device,
        "model.quantized_weights": args.quantized_weights,
        "model.max_model_len": args.max_model_len,
        "cache.block_size": args.block_size,
        "cache.num_device_blocks": args.num_kv_blocks,
        "cache.enable_prefix_caching": False if args.no_prefix_caching else None,
        "scheduler.max_tokens_per_step": args.max_tokens_per_step,
        "scheduler.max_num_seqs": args.max_num_seqs,
        "parallel.tensor_parallel_size": args.tp,
        "parallel.sequence_parallel_size": args.sp,
        "parallel.executor": args.executor,
        "parallel.span_nodes": args.span_nodes,
        "kv_tiers.host_bytes": args.kv_host_bytes,
        "kv_tiers.redis_urls": split_urls(args.kv_redis_url),
    }
    for flag, key in (("served_model_name", "serve.model_name"), ("api_key", "serve.api_key"),
                      ("num_replicas", "serve.num_replicas")):
        overrides[key] = getattr(args, flag, None)
    if overrides["kv_tiers.redis_urls"] and args.kv_host_bytes is None and base.kv_tiers.host_bytes == 0:
        overrides["kv_tiers.host_bytes"] = DEFAULT_REDIS_STAGING_BYTES
        print(f"longctx: Redis blocks stage through {DEFAULT_REDIS_STAGING_BYTES >> 30} GiB of host memory per "
              "worker (--kv-host-bytes sets it)", file=sys.stderr)  # fmt: skip
    return overrides


def split_urls(values: list[str] | None) -> tuple[str, ...] | None:
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
