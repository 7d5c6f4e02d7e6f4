"""What vouches for a KV block read back from Redis: a checksum, or a keyed MAC.

A checksum (crc32) finds accidents: corruption, truncation. Anyone who can write to Redis can
also recompute it, so a forged block (its payload changed, its crc32 recomputed) would be taken
as a hit and change every output that uses it, for every replica and tenant. A MAC cannot be
recomputed without its secret key: HMAC-SHA256 over

    context (the block's Redis key prefix: model, checkpoint, rank) || header || payload

so a value that verifies was written by a holder of the key, for this namespace, as this block
(the header names the block hash, dtype and shape). HMAC-SHA256 rather than keyed BLAKE2b: with
the SHA extensions of current x86 and ARM cores it runs ~2x faster (bench/kv_tiers.py measures
it); both release the GIL, on the Redis I/O threads, off the decode path.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from protocol.kv_transfer_ops import CHECKSUM, MISMATCH, UNAUTHENTIC

try:  # ISA-L's crc32: the same checksum as zlib's, 5-12x faster a core (docs/measurements/cpu-kv_client_micro.txt)
    from isal.isal_zlib import crc32
except ImportError:  # the `serve` extra brings it; without it, zlib's (a GPU image without wheels)
    from zlib import crc32

TAG_NBYTES = 32  # the header's tag field: a SHA-256 MAC, or a crc32 and zeros
MIN_KEY_BYTES = 16


class ChecksumSeal:
    """crc32 of the payload: finds accidents, not someone with write access. Per GB read it was
    half the client's CPU with zlib's crc32 (1.8-2 GB/s a core on the H200 host, ~1 s of CPU
    per GB in all); ISA-L's computes the same value several times faster."""

    kind = 0
    failed = CHECKSUM  # the outcome of a tag that does not match
    other_kind = MISMATCH  # a MAC-sealed value: another deployment's, not readable here

    def tag(self, header: bytes, payload) -> bytes:
        return crc32(payload).to_bytes(4, "little") + bytes(TAG_NBYTES - 4)


class MacSeal:
    """HMAC-SHA256 under a secret key over (context, header, payload)."""

    kind = 1
    failed = UNAUTHENTIC
    other_kind = UNAUTHENTIC  # a checksummed value where a MAC is required: anyone could have written it

    def __init__(self, key: bytes, context: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a KV MAC key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._keyed = hmac.new(key, context, "sha256")  # key and context absorbed once, copied per block

    def tag(self, header: bytes, payload) -> bytes:
        mac = self._keyed.copy()
        mac.update(header)
        mac.update(payload)
        return mac.digest()


CHECKSUM_SEAL = ChecksumSeal()
Seal = ChecksumSeal | MacSeal


def seal_for(mac_key: str | None, mac_key_file: str | None, context: bytes) -> Seal:
    """The MAC seal when a key is configured (inline or in a file), the checksum otherwise."""
    if mac_key_file is not None:
        mac_key = _read_key(mac_key_file)
    return CHECKSUM_SEAL if mac_key is None else MacSeal(mac_key.encode("utf-8"), context)


def _read_key(path: str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"kv_tiers.redis_mac_key_file: cannot read {path}: {error}") from None
    if not key:
        raise ValueError(f"kv_tiers.redis_mac_key_file: {path} is empty")
    return key
