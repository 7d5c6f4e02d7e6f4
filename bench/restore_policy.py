"""Does the cost policy pick the faster of restoring a cached prefix from Redis and recomputing it?

For each context length: a writer engine prefills two documents (writing their blocks through to
Redis); then, each on a fresh engine (another replica), the TTFT of
  recompute   no tiers: the whole prompt is computed;
  restore     restore_policy=always: the prefix comes from Redis;
  cost        restore_policy=cost, after a warm-up that measured both sides (a 16K-token Redis
              restore and a 16K-token prefill): the engine decides, and the row says what.
Restore time grows linearly with the context, recompute quadratically (attention), so short
contexts should be recomputed and long ones restored; `chose_faster` checks that per length.

GPU:  source .gpu/install.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 bench/restore_policy.py --device cuda
CPU:  python bench/restore_policy.py   (a tiny model, short contexts: checks the script, not speed)
Writes $OUT/restore_policy_<device>.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from kv_tiers import engine_for, make_ttft_model, release, settle, start_redis, ttft_row
from report import print_table, write_json  # bench/ is on sys.path when a script runs

from kvcache.tiers.host_index import REDIS

WARMUP_TOKENS = 16384


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="context lengths (default 16K 64K 256K on GPU, 2K 8K on CPU)")
    parser.add_argument("--ttft-layers", type=int, default=2, help="GPU model: Llama-3-8B shape, this many layers")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.contexts = args.contexts or ([16384, 65536, 262144] if cuda else [2048, 8192])
    args.context_tokens = max(args.contexts)  # make_ttft_model sizes the CPU model's positions by it
    args.model_dtype = "bfloat16" if cuda else "float32"
    args.ttft_block_size = 64
    args.max_tokens_per_step = 8192 if cuda else 2048
    args.warmup_tokens = WARMUP_TOKENS if cuda else 1024
    return args


class Documents:
    def __init__(self, vocab: int):
        self.rng, self.vocab = random.Random(2), vocab

    def new(self, length: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(length)]


def blocks_for(args, length: int) -> int:
    return -(-length // args.ttft_block_size) + 16


def host_bytes_for(engine_blocks: int, block_nbytes: int) -> int:
    return engine_blocks * block_nbytes


def write_documents(args, model_dir: str, url: str, docs: list[list[int]]) -> int:
    """Prefill each document on a writer engine (write-through to Redis); returns a block's bytes."""
    blocks = blocks_for(args, max(map(len, docs)))
    probe = engine_for(args, model_dir, 16, None)
    block_nbytes = probe.executor.kv_block_nbytes
    release(probe)
    writer = engine_for(args, model_dir, blocks, url, host_bytes=host_bytes_for(blocks, block_nbytes),
                        restore_policy="always")
    for doc in docs:
        ttft_row("write", writer, doc)
        settle(writer)
    release(writer)
    return block_nbytes


def decisions(engine) -> dict[str, float]:
    registry = engine.kv_cache.metrics.registry
    return {d: registry.get_sample_value("longctx_kv_restore_decisions_total", {"tier": REDIS, "decision": d}) or 0
            for d in ("restore", "recompute")}


def cost_run(args, model_dir: str, url: str, block_nbytes: int, doc: list[int], warm: list[list[int]]) -> dict:
    """An engine that has restored one document from Redis and prefilled another, then decides."""
    blocks = blocks_for(args, len(doc))
    engine = engine_for(args, model_dir, blocks, url, host_bytes=host_bytes_for(blocks, block_nbytes),
                        restore_policy="always")
    ttft_row("warm-up restore", engine, warm[0])  # measures Redis -> host -> device
    engine.kv_cache.tiers.cost.policy = "never"
    ttft_row("warm-up prefill", engine, warm[1])  # measures the prefill speed
    engine.kv_cache.tiers.cost.policy = "cost"
    before = decisions(engine)
    row = ttft_row("cost", engine, doc)
    after = decisions(engine)
    row["decision"] = next((d for d in after if after[d] > before[d]), "none")
    estimate = engine.kv_cache.tiers.cost.decide(REDIS, 0, (len(doc) - 1) // args.ttft_block_size)
    row["estimated_restore_s"] = round(estimate.restore_s, 4)
    row["estimated_recompute_s"] = round(estimate.recompute_s, 4)
    release(engine)
    return row


def fixed_run(args, model_dir: str, url: str | None, block_nbytes: int, doc: list[int], scenario: str) -> dict:
    blocks = blocks_for(args, len(doc))
    tiers = {"host_bytes": host_bytes_for(blocks, block_nbytes), "restore_policy": "always"} if url else {}
    engine = engine_for(args, model_dir, blocks, url, **tiers)
    row = ttft_row(scenario, engine, doc)
    release(engine)
    return row


def bench_length(args, model_dir: str, url: str, docs: Documents, length: int) -> list[dict]:
    restored, decided = docs.new(length), docs.new(length)
    warm = [docs.new(args.warmup_tokens), docs.new(args.warmup_tokens)]
    block_nbytes = write_documents(args, model_dir, url, [restored, decided, warm[0]])
    rows = [fixed_run(args, model_dir, None, block_nbytes, restored, "recompute"),
            fixed_run(args, model_dir, url, block_nbytes, restored, "restore (always)"),
            cost_run(args, model_dir, url, block_nbytes, decided, warm)]
    faster = "restore" if rows[1]["ttft_s"] < rows[0]["ttft_s"] else "recompute"
    rows[2]["chose_faster"] = rows[2]["decision"] == faster
    columns = {"context_tokens": length, **{key: "" for row in rows for key in row}}
    return [{**columns, **row} for row in rows]  # one set of columns for the table


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "block_size": args.ttft_block_size, "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_redis(folder)
        try:
            model_dir, vocab = make_ttft_model(args, folder)
            docs = Documents(vocab)
            for length in args.contexts:
                rows = bench_length(args, model_dir, f"redis://127.0.0.1:{port}", docs, length)
                results["rows"] += rows
                print_table(f"Restore from Redis or recompute: {length} tokens ({name})", rows)
        finally:
            process.kill()
    write_json(f"restore_policy_{'cuda' if device.type == 'cuda' else 'cpu'}", results)


if __name__ == "__main__":
    main()
