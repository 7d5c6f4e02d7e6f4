"""Redis key names: one namespace per (model, weights, KV layout, rank), then the block hash.

The chained block hash already folds in the architecture fingerprint, the KV layout (dtype,
block size, parallel layout) and the tenant salt. The explicit namespace adds what it lacks: the
checkpoint. Two fine-tunes of one architecture share a fingerprint but not their KV, so the
namespace names the weight files' content (or an operator-given name), and the rank whose KV
heads / sequence shard the value holds. It is readable as a prefix, so an operator can list or
drop one model's blocks: `longctx:kv:v2:<namespace>:*`.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from model_shards.kv_io.codec import FORMAT_VERSION

_READ_NBYTES = 16 << 20


def key_namespace(model_fingerprint: str, checkpoint: str, rank: int = 0) -> str:
    """A 16-hex-digit digest of everything that decides a block's bytes besides its tokens."""
    text = f"{model_fingerprint}|checkpoint={checkpoint}|rank={rank}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_prefix(prefix: str, namespace: str) -> bytes:
    return f"{prefix}:kv:v{FORMAT_VERSION}:{namespace}:".encode()


def block_key(prefix: bytes, block_hash: bytes) -> bytes:
    return prefix + block_hash.hex().encode()


def checkpoint_digest(folder: str | Path) -> str:
    """sha256 over the weight files' names and contents (files hashed in parallel threads).

    ~2 s per 8 GB of weights on 4 cores; computed once per worker start, and only when Redis is
    configured without an explicit `redis_namespace`.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files to name the checkpoint by")
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        digests = list(pool.map(_file_digest, files))
    combined = hashlib.sha256()
    for path, digest in zip(files, digests):
        combined.update(f"{path.name}:{digest}\n".encode())
    return combined.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_NBYTES):
            digest.update(chunk)  # releases the GIL for large chunks: files hash in parallel
    return digest.hexdigest()



def part_key(key: bytes, index: int) -> bytes:
    """The key of part `index` >= 1 of a value stored in parts (part 0 is the key itself)."""
    return b"%s:%d" % (key, index)
