"""The one rule that names a model's KV cache.

Prefix-cache hashes (driver) and Redis keys (every worker) both start from this string: two
processes that disagreed on it would either never share a block or, worse, share blocks of
different shapes. It joins the checkpoint's architecture fingerprint with the KV layout (dtype,
block size, parallel layout and the rank's place in it, `protocol.worker_description`).
"""

from __future__ import annotations


def kv_fingerprint(architecture_fingerprint: str, kv_layout: str) -> str:
    return f"{architecture_fingerprint}|{kv_layout}"
