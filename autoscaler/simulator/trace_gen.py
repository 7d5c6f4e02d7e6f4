"""Bursty long-context traces: steady short chat turns, and now and then a burst of long prompts.

Short requests (512-2,048 tokens, half of them behind one shared system prompt) arrive as a
Poisson stream all along. Bursts arrive with exponential gaps; each brings a few documents of
200K-1M tokens (log-uniform: as many 200-400K as 500K-1M ones) and one to three questions about
each, which share the document's hash ids and differ in a last block of their own. That is the
load request-count scaling misreads: a burst is a handful of requests and hours of prefill.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import count

from autoscaler.simulator.trace import BLOCK_TOKENS, TraceRequest


@dataclass(frozen=True)
class TraceShape:
    duration_s: float = 3600.0
    short_rate_per_s: float = 0.5
    short_tokens: tuple[int, int] = (512, 2048)
    short_output_tokens: tuple[int, int] = (64, 512)
    system_prompt_share: float = 0.5  # of short requests, behind the one shared system prompt
    burst_interval_s: float = 600.0  # mean gap between bursts (exponential)
    documents_per_burst: tuple[int, int] = (2, 5)
    questions_per_document: tuple[int, int] = (1, 3)
    burst_span_s: float = 300.0  # a burst's requests arrive within this
    long_tokens: tuple[int, int] = (200_000, 1_000_000)
    long_output_tokens: tuple[int, int] = (100, 1000)
    seed: int = 0


def generate_trace(shape: TraceShape) -> list[TraceRequest]:
    rng = random.Random(shape.seed)
    block_ids = count()
    system_prompt = (next(block_ids),)
    requests = _short_requests(shape, rng, block_ids, system_prompt) + _bursts(shape, rng, block_ids)
    return sorted(requests, key=lambda request: request.arrival_s)


def _short_requests(shape: TraceShape, rng: random.Random, block_ids, system_prompt) -> list[TraceRequest]:
    requests, now = [], rng.expovariate(shape.short_rate_per_s)
    while now < shape.duration_s:
        length = rng.randint(*shape.short_tokens)
        shared = system_prompt if rng.random() < shape.system_prompt_share else ()
        hash_ids = shared + tuple(next(block_ids) for _ in range(_blocks(length) - len(shared)))
        requests.append(TraceRequest(now, length, rng.randint(*shape.short_output_tokens), hash_ids))
        now += rng.expovariate(shape.short_rate_per_s)
    return requests


def _bursts(shape: TraceShape, rng: random.Random, block_ids) -> list[TraceRequest]:
    requests, start = [], rng.expovariate(1.0 / shape.burst_interval_s)
    while start < shape.duration_s:
        for _ in range(rng.randint(*shape.documents_per_burst)):
            requests += _questions_about_one_document(shape, rng, block_ids, start)
        start += rng.expovariate(1.0 / shape.burst_interval_s)
    return requests


def _questions_about_one_document(shape: TraceShape, rng: random.Random, block_ids, start: float) -> list[TraceRequest]:
    low, high = shape.long_tokens
    document_tokens = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    document = tuple(next(block_ids) for _ in range(document_tokens // BLOCK_TOKENS))
    questions = []
    for _ in range(rng.randint(*shape.questions_per_document)):
        length = len(document) * BLOCK_TOKENS + rng.randint(16, BLOCK_TOKENS)  # the question: a last block
        arrival = start + rng.uniform(0, shape.burst_span_s)
        output = rng.randint(*shape.long_output_tokens)
        questions.append(TraceRequest(arrival, length, output, document + (next(block_ids),)))
    return questions


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_TOKENS)
