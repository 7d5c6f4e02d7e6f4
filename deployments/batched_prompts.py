"""A completion request with several prompts (`prompt: [...]`): one generate call per prompt,
their replies merged into one stream as they come.

Choice `index` follows OpenAI: prompt i's j-th sequence is choice i * n + j. Each prompt is its
own request to the replicas, so the router places each by its own prefix. An error from any
prompt ends the merged stream; closing it closes every prompt's call (the engines abort them).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from deployments.generation import Reply
from deployments.messages import GenerateRequest, ServeError
from protocol.sampling_params import SamplingParams


def requests_per_prompt(request_id: str, prompts: list[list[int]], params: SamplingParams,
                        cache_salt: str | None) -> list[GenerateRequest]:  # fmt: skip
    """One generate request per prompt; with several, ids `<request_id>-<prompt index>`."""
    if len(prompts) == 1:
        return [GenerateRequest(request_id, prompts[0], params, cache_salt)]
    return [GenerateRequest(f"{request_id}-{index}", token_ids, params, cache_salt)
            for index, token_ids in enumerate(prompts)]  # fmt: skip


class _Done:
    pass


@dataclasses.dataclass
class _Failed:
    error: BaseException


async def merged_replies(sources: Sequence[AsyncIterator[Reply]], n: int) -> AsyncIterator[Reply]:
    if len(sources) == 1:
        async for reply in sources[0]:
            yield reply
        return
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(prompt, source, queue)) for prompt, source in enumerate(sources)]
    try:
        remaining = len(sources)
        while remaining:
            prompt, item = await queue.get()
            if isinstance(item, _Done):
                remaining -= 1
            elif isinstance(item, _Failed):
                raise item.error
            elif isinstance(item, ServeError):
                yield item
                return
            else:
                yield [dataclasses.replace(delta, index=prompt * n + delta.index) for delta in item]
    finally:
        for pump in pumps:
            pump.cancel()  # a cancelled pump's generator unwinds: its Serve call is cancelled
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(prompt: int, source: AsyncIterator[Reply], queue: asyncio.Queue) -> None:
    try:
        async for reply in source:
            queue.put_nowait((prompt, reply))
    except Exception as error:  # noqa: BLE001 - re-raised by the consumer
        queue.put_nowait((prompt, _Failed(error)))
        return
    queue.put_nowait((prompt, _Done()))
