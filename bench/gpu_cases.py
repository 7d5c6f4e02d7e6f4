"""The measurements of bench/gpu.py, one function each; every one returns a dict of plain numbers.

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128, hidden 4096, MLP 14336) with
few layers: per-layer figures are what a 32-layer model gets per layer (layers are identical).
FLOP counts: a causal attention over L tokens is 4 * (L^2 / 2) * heads * head_dim; the linear
layers 2 * L * parameters.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 32, 8, 128, 4096, 14336, 128256
LAYER_PARAMETERS = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * FFN


def causal_attention_flops(tokens: int) -> float:
    return 4 * tokens * tokens / 2 * HEADS * HEAD_DIM


def prefill_flops(tokens: int, layers: int) -> float:
    """Whole model: layers x (linear + causal attention), plus the LM head of the last token."""
    return layers * (2 * tokens * LAYER_PARAMETERS + causal_attention_flops(tokens)) + 2 * HIDDEN * VOCAB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- ceilings ------------------------------------------------------------------------------------
def matmul_ceiling(device: torch.device, size: int = 8192) -> dict:
    """bf16 (float32 on the CPU) dense matmul rate on random data."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return {"size": size, "TFLOPs": 2 * size**3 / seconds / 1e12}


def copy_ceiling(device: torch.device, gib: float = 2.0) -> dict:
    """Device-to-device copy rate, bytes read + written per second."""
    source = torch.randn(int(gib * 2**30) // 4, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats=10, warmup=2)
    return {"GiB": gib, "GBps": 2 * source.numel() * 4 / seconds / 1e9}


# --- attention alone, one layer ------------------------------------------------------------------
def raw_sdpa(tokens: int, device: torch.device) -> dict:
    """cuDNN SDPA on one contiguous causal (tokens, tokens) problem: the kernel's own rate."""
    from model_shards.parallel.lse_attention import PREFILL_PREFERENCE, select_kernel

    name, kernel = select_kernel(device, torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, PREFILL_PREFERENCE)
    q = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    short = tokens <= 131072  # longer ones run once: 5 s at 512K, 19 s at 1M on an H200
    seconds = median_seconds(lambda: kernel(q, k, v, HEAD_DIM ** -0.5, True), device, repeats=3 if short else 1,
                             warmup=1 if short else 0)
    return {"kernel": name, "seconds": seconds, "TFLOPs": causal_attention_flops(tokens) / seconds / 1e12}


def chunked_prefill_attention(tokens: int, step_tokens: int, block_size: int, device: torch.device) -> dict:
    """One layer's attention for a tokens-long prompt in step_tokens chunks, exactly as the engine
    runs it (the attention backend over a paged cache in shuffled blocks), new random q/k/v a chunk."""
    from model_shards.attention import get_attention_backend, resolve_attention_backend
    from model_shards.attention.base import AttentionMetadata

    name = resolve_attention_backend("auto", device, torch.bfloat16, block_size, HEAD_DIM, HEADS, KV_HEADS)
    backend = get_attention_backend(name)
    backend.warm_up(device, torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, block_size, step_tokens, tokens + step_tokens)
    num_blocks = -(-tokens // block_size)
    cache = torch.zeros(num_blocks, 2, block_size, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    table = torch.randperm(num_blocks).tolist()
    chunks = []
    for start in range(0, tokens, step_tokens):
        count = min(step_tokens, tokens - start)
        metadata = AttentionMetadata.build([(table, start, count)], block_size, device)
        q = torch.randn(count, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(count, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
        chunks.append((q, k, v, metadata))

    def run_all():
        for q, k, v, metadata in chunks:
            backend.forward(q, k, v, cache, metadata, HEAD_DIM ** -0.5)

    seconds = median_seconds(run_all, device, repeats=1, warmup=1 if tokens <= 131072 else 0)
    return {"backend": name, "seconds": seconds, "TFLOPs": causal_attention_flops(tokens) / seconds / 1e12}


def graph_seconds(calls: list, device: torch.device, replays: int = 10) -> float:
    """Device time of one call: `calls` (distinct buffers each, so L2 holds none of the next one's
    data) captured back to back in one CUDA graph, replayed between events; no host launch cost,
    as in the engine's decode graphs. On the CPU: host time."""
    if device.type != "cuda":
        return median_seconds(lambda: [call() for call in calls], device, repeats=replays) / len(calls)
    for call in calls:  # compiles, and settles the allocator outside the capture
        call()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / len(calls)


class DecodeCase:
    """`batch` sequences of `tokens` each in distinct shuffled blocks of one-layer caches, enough
    copies of it on a GPU that they overflow its L2 (50 MB on an H200; the bench cycles through them)."""

    def __init__(self, batch: int, tokens: int, block_size: int, device: torch.device):
        l2_bytes = 256 << 20 if device.type == "cuda" else 0
        self.batch, self.tokens, self.device = batch, tokens, device
        self.kv_bytes = batch * tokens * KV_HEADS * HEAD_DIM * 2 * 2
        blocks = batch * -(-tokens // block_size)
        self.copies = []
        for _ in range(max(1, -(-l2_bytes // self.kv_bytes))):
            cache = torch.randn(blocks, 2, block_size, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
            tables = torch.randperm(blocks, device=device).view(batch, -1).to(torch.int32)
            self.copies.append((cache, tables))
        self.seq_lens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
        self.query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None

    def calls(self, plan) -> list:
        from model_shards.attention.triton_paged_decode import paged_decode

        return [lambda cache=cache, tables=tables: paged_decode(self.query, cache, tables, self.seq_lens,
                                                                HEAD_DIM ** -0.5, self.tokens, plan, self.num_sms)
                for cache, tables in self.copies]

    def rate(self, plan, repeats: int) -> dict:
        """Device time per call (graph replay) and its KV read rate; the host-timed single call too."""
        calls = self.calls(plan)
        seconds = graph_seconds(calls, self.device, replays=repeats)
        host = median_seconds(calls[0], self.device, repeats=repeats, warmup=min(3, repeats))
        return {"splits": plan.splits_for(self.tokens), "ms": seconds * 1e3, "GBps": self.kv_bytes / seconds / 1e9,
                "host_ms": host * 1e3, "host_GBps": self.kv_bytes / host / 1e9}


def paged_decode_rate(batch: int, tokens: int, block_size: int, device: torch.device, repeats: int = 20) -> dict:
    """The engine's paged decode (its default plan) over `batch` sequences of `tokens` each."""
    from model_shards.attention.triton_paged_decode import DEFAULT_PLAN

    return DecodeCase(batch, tokens, block_size, device).rate(DEFAULT_PLAN, repeats)


def sweep_plans() -> list:
    """Split caps x smallest splits x tile sizes x warps x pipeline stages (4 waves of programs)."""
    from model_shards.attention.triton_paged_decode import DecodePlan

    return [DecodePlan(max_splits=splits, min_split_tiles=min_tiles, tile_tokens=tile, num_warps=warps,
                       num_stages=stages)
            for splits in (64, 128, 256) for min_tiles in (2, 4) for tile in (64, 128) for warps in (4, 8)
            for stages in (2, 3)]


def decode_sweep(device: torch.device, cases: list[tuple[int, int]], block_size: int, plans: list,
                 repeats: int = 10) -> dict:
    """Every plan on each (batch, tokens) case: device ms and KV GB/s, or why it failed."""
    from dataclasses import asdict

    rows = {}
    for batch, tokens in cases:
        case = DecodeCase(batch, tokens, block_size, device)
        results = []
        for plan in plans:
            try:
                results.append({**asdict(plan), **case.rate(plan, repeats)})
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: recorded
                results.append({**asdict(plan), "error": f"{type(error).__name__}: {str(error)[:120]}"})
        rows[f"{batch}x{tokens}"] = results
        del case
        free_memory()
    return rows


# --- correctness ---------------------------------------------------------------------------------
# (block size, query heads, KV heads, splits): GQA 4, 7 and 1; 64 splits as at batch 1
DECODE_CHECK_SHAPES = [(16, 32, 8, 7), (64, 32, 8, 64), (256, 28, 4, 3), (64, 32, 32, 16)]


def triton_vs_reference(device: torch.device, longest: int = 40_000, shapes=DECODE_CHECK_SHAPES,
                        seed: int = 0) -> list[dict]:
    """The Triton decode against the torch reference on random layouts, several shapes (bf16)."""
    from model_shards.attention.triton_paged_decode import DecodePlan, paged_decode, paged_decode_reference

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for block_size, heads, kv_heads, splits in shapes:
        lengths = [1, longest // 40, longest, longest * 3 // 4, 5]
        width = max(-(-n // block_size) for n in lengths)
        num_blocks = width * len(lengths)
        cache = torch.randn(num_blocks, 2, 2, block_size, kv_heads, HEAD_DIM, generator=generator)
        cache = cache.to(device=device, dtype=torch.bfloat16)[:, 1]
        tables = torch.randperm(num_blocks, generator=generator)[:width * len(lengths)].view(len(lengths), width)
        tables, seq_lens = tables.to(device, torch.int32), torch.tensor(lengths, dtype=torch.int32, device=device)
        query = torch.randn(len(lengths), heads, HEAD_DIM, generator=generator).to(device=device, dtype=torch.bfloat16)
        plan = DecodePlan(max_splits=splits, min_split_tiles=1)
        out = paged_decode(query, cache, tables, seq_lens, HEAD_DIM ** -0.5, max(lengths), plan).float()
        ref = paged_decode_reference(query, cache, tables, seq_lens, HEAD_DIM ** -0.5).float()
        error = ((out - ref).norm() / ref.norm()).item()
        rows.append({"block_size": block_size, "heads": heads, "kv_heads": kv_heads, "splits": splits,
                     "relative_error": error, "pass": error < 1e-2})
    return rows
