"""CPU a request of the HTTP app alone, engine stubbed: what the replica's event loop spends to
take in one streamed completion whose prompt is a long list of token ids (parse, validate,
check, answer), the part a burst of requests pays one after another while the engine thread
wants the same GIL. The stub backend answers one token at once; the in-process httpx client's
own share is counted too (small: the body is sent as ready bytes).

    python bench/serve_ingest.py                        # 33,024 token ids (a 32K prefix + 256), 30 requests
    python bench/serve_ingest.py --prompt-tokens 4096 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import random
import tempfile
import time
from pathlib import Path


class StubBackend:
    """`LLMBackend` that finishes every request with one token, no engine."""

    async def generate(self, request):
        from engine.outputs import CompletionDelta

        yield [CompletionDelta(request.request_id, 0, "x", (5,), (), True, "length", len(request.prompt_token_ids), 1, 0)]

    async def replica_stats(self, timeout_s: float) -> list[dict]:
        return []

    async def replica_metrics(self, timeout_s: float) -> list[dict]:
        return []


def build_app(prompt_tokens: int):
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings
    from deployments.ingress import http_app
    from model_shards.make_model import make_model

    folder = make_model(Path(tempfile.mkdtemp(prefix="longctx-ingest-")) / "tiny", "tiny",
                        max_position_embeddings=prompt_tokens + 1024)  # fmt: skip
    config = LongctxConfig(model=ModelSettings(path=str(folder)), cache=CacheSettings(num_device_blocks=64))
    return http_app(StubBackend(), config), Path(folder).name


async def cpu_ms_per_request(app, body: bytes, requests: int) -> tuple[float, float]:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in-process") as client:
        async def one() -> None:
            response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text[:300]

        await one()  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            await one()
        return (time.process_time() - cpu) / requests * 1e3, (time.perf_counter() - wall) / requests * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=33024)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="cProfile the requests, top 20 by own time")
    args = parser.parse_args()
    app, model = build_app(args.prompt_tokens)
    ids = [random.Random(0).randrange(100, 1000) for _ in range(args.prompt_tokens)]
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": 64, "temperature": 0.0, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    cpu_ms, wall_ms = asyncio.run(cpu_ms_per_request(app, body, args.requests))
    print(f"{args.prompt_tokens} token ids ({len(body)} bytes): {cpu_ms:.2f} CPU ms, {wall_ms:.2f} wall ms a request")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        asyncio.run(cpu_ms_per_request(app, body, args.requests))
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
