"""What a replica still owes in prefill, net of prefix hits: the autoscaler's signal. No tensors.

A waiting request's prompt is not all work: its leading blocks may already be in the device
cache, or be the same document as a request queued ahead of it, which computes them first (ten
questions about one 500K-token contract are 500K tokens of prefill, not 5M). Both are estimated
once, when the request arrives (`expected_hit_tokens`), since a lookup per step would cost
O(queued blocks) per step. Tokens restored from host memory or Redis still count as work here:
they are faster than compute, but not free.

Seconds come from the KV tiers' cost model, measured while serving, in FLOPs: a token at
position p attends to p + 1 keys, so the last 100K tokens of a 1M-token prompt cost several
times the first 100K, which a rate in tokens/s cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.request import Request
from kvcache.kv_cache_manager import KVCacheManager
from kvcache.tiers.cost_model import RestoreCostModel


@dataclass(frozen=True)
class PrefillBacklog:
    num_tokens: int  # prompt tokens still to compute, net of expected prefix hits
    seconds: float  # their estimated compute time on this replica
    num_decoding: int  # running sequences past their prompt
    longest_request_tokens: int  # prompt + output of the longest request in flight


def expected_hit_tokens(request: Request, cache: KVCacheManager, pending: Iterable[Request]) -> int:
    """Leading prompt tokens a new request is not expected to compute: the longer of its hit in
    the device cache and its shared prefix with a request already pending (same chain root)."""
    if not cache.enable_prefix_caching:
        return 0
    _, num_cached = cache.find_cached_prefix(request.block_hashes, request.num_prompt_tokens)
    max_blocks = (request.num_prompt_tokens - 1) // request.block_size  # the last token is computed
    shared = max((_shared_blocks(request.block_hashes, other.block_hashes, max_blocks) for other in pending), default=0)
    return max(num_cached, shared * request.block_size)


def _shared_blocks(hashes: list[bytes], other: list[bytes], limit: int) -> int:
    """Length of the common leading run, by bisection: block i's hash names the whole prefix up
    to it, so equal hashes at i mean equal hashes at every j < i."""
    low, high = 0, min(len(hashes), len(other), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if hashes[middle - 1] == other[middle - 1]:
            low = middle
        else:
            high = middle - 1
    return low


def measure_backlog(waiting: Iterable[Request], running: Iterable[Request], cost: RestoreCostModel) -> PrefillBacklog:
    seconds, tokens, decoding, longest = 0.0, 0, 0, 0
    for request in running:
        longest = max(longest, request.num_tokens)
        if request.num_computed_tokens >= request.num_prompt_tokens:
            decoding += 1
            continue
        seconds += cost.prefill_seconds(request.num_computed_tokens, request.num_prompt_tokens)
        tokens += request.num_prompt_tokens - request.num_computed_tokens
    for request in waiting:
        longest = max(longest, request.num_tokens)
        start = max(request.num_computed_tokens, request.num_expected_hit_tokens)
        seconds += cost.prefill_seconds(start, request.num_prompt_tokens)
        tokens += request.num_prompt_tokens - start
    return PrefillBacklog(tokens, seconds, decoding, longest)
