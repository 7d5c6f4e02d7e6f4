"""What an engine is, in the few lines a server prints and logs when it starts: the model, how
it is held and split, the KV capacity of every tier in tokens, whether Redis answers."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.redis_urls import parse_redis_url


@dataclass(frozen=True)
class EngineSummary:
    model_path: str
    dtype: str
    device: str
    tensor_parallel_size: int
    sequence_parallel_size: int
    executor: str
    block_size: int
    device_kv_tokens: int
    host_kv_tokens: int  # 0: no host tier
    redis_shards: tuple[str, ...]  # host:port names, no passwords; () without Redis
    redis_up: bool | None
    load_seconds: float

    def lines(self) -> list[str]:
        parallel = f"TP {self.tensor_parallel_size} x SP {self.sequence_parallel_size} ({self.executor} executor)"
        return [
            f"model {self.model_path}: {self.dtype} on {self.device}, {parallel}, loaded in {self.load_seconds:.1f} s",
            f"KV cache: device {self.device_kv_tokens:,} tokens (blocks of {self.block_size}), "
            f"host {_tokens_or_off(self.host_kv_tokens)}, Redis {self._redis()}",
        ]

    def _redis(self) -> str:
        if not self.redis_shards:
            return "off"
        state = {True: "reachable", False: "UNREACHABLE (serving without it)", None: "not checked yet"}[self.redis_up]
        return f"{', '.join(self.redis_shards)} {state}"


def _tokens_or_off(num_tokens: int) -> str:
    return f"{num_tokens:,} tokens" if num_tokens else "off"


def redis_shard_names(urls: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(parse_redis_url(url).name for url in urls)
