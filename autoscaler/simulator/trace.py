"""Traces in the Mooncake format: one JSON object a line, requests in arrival order.

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

`timestamp` is milliseconds since the trace began; `hash_ids` names each 512-token block of the
prompt by its prefix, so two requests whose lists start alike share that prompt prefix (the
prefix cache can serve it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BLOCK_TOKENS = 512  # tokens a Mooncake hash id stands for


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the line."""


def read_trace(path: str | Path) -> list[TraceRequest]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise TraceError(f"cannot read trace {path}: {error.strerror}") from None
    requests = [_parse(line, number, path) for number, line in enumerate(lines, 1) if line.strip()]
    if not requests:
        raise TraceError(f"trace {path} has no requests")
    return sorted(requests, key=lambda request: request.arrival_s)


def _parse(line: str, number: int, path: str | Path) -> TraceRequest:
    try:
        record = json.loads(line)
        request = TraceRequest(
            arrival_s=float(record["timestamp"]) / 1000.0,
            input_length=int(record["input_length"]),
            output_length=int(record["output_length"]),
            hash_ids=tuple(int(block) for block in record.get("hash_ids", ())),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise TraceError(f"{path}:{number}: not a Mooncake trace record ({error!r})") from None
    if request.input_length < 1 or request.output_length < 0 or request.arrival_s < 0:
        raise TraceError(f"{path}:{number}: lengths and timestamp must be non-negative, input_length >= 1")
    return request


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    lines = [
        json.dumps({"timestamp": round(request.arrival_s * 1000), "input_length": request.input_length,
                    "output_length": request.output_length, "hash_ids": list(request.hash_ids)})
        for request in requests
    ]
    Path(path).write_text("\n".join(lines) + "\n")
