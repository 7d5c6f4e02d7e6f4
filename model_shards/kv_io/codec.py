"""One KV block as one self-checking value: a header, then the raw payload.

Redis keeps one value per block, so its eviction drops whole blocks, never half of one. The
header lets a reader reject anything it cannot use bit for bit; every rejection is a miss that
is recomputed, never a block that is used.

Header, little-endian (`_FIXED`, then `ndim` u32 dims):

    magic b"LCKV" | version u16 | header bytes u16 | crc32 u32 | payload bytes u64
    | block hash 32 bytes | dtype 16 bytes ASCII, NUL-padded | ndim u8 | dims

crc32 (zlib): ~4 GB/s on one core and releases the GIL, so background threads check blocks in
parallel; it detects corruption and truncation, which is its job here (keys are not secret,
the block hash in the header catches a value stored under the wrong key).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from protocol.kv_transfer_ops import CHECKSUM, HIT, MISMATCH, MISSING, TRUNCATED

MAGIC = b"LCKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHIQ32s16sB")
_DTYPE_NBYTES = 16


@dataclass(frozen=True)
class BlockFormat:
    """What every block of one KV cache looks like: the dtype name and per-block shape."""

    dtype: str  # "float32", "bfloat16", "float16"
    shape: tuple[int, ...]  # (layers, 2, block_size, kv_heads, head_dim)
    nbytes: int

    @property
    def header_nbytes(self) -> int:
        return _FIXED.size + 4 * len(self.shape)

    def header(self, block_hash: bytes, crc: int) -> bytes:
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, self.header_nbytes, crc, self.nbytes, block_hash,
                            self.dtype.encode("ascii"), len(self.shape))
        return fixed + struct.pack(f"<{len(self.shape)}I", *self.shape)


def checksum(payload) -> int:
    return zlib.crc32(payload)


def encode_block(fmt: BlockFormat, block_hash: bytes, payload) -> bytes:
    """header + payload as one bytes object (one copy of the payload)."""
    return bytes(encode_block_into(fmt, block_hash, payload, bytearray(fmt.header_nbytes + fmt.nbytes)))


def encode_block_into(fmt: BlockFormat, block_hash: bytes, payload, out: bytearray) -> memoryview:
    """Write header + payload into `out` (exactly that long, reusable) and return a view of it."""
    view = memoryview(payload).cast("B")
    if view.nbytes != fmt.nbytes or len(out) != fmt.header_nbytes + fmt.nbytes:
        raise ValueError(f"block payload has {view.nbytes} bytes, its format says {fmt.nbytes}")
    out[: fmt.header_nbytes] = fmt.header(block_hash, checksum(view))
    out[fmt.header_nbytes :] = view
    return memoryview(out)


def decode_block(fmt: BlockFormat, block_hash: bytes, value: bytes | None) -> tuple[str, memoryview | None]:
    """(HIT, payload view) or (a miss outcome, None). Never trusts anything it did not check."""
    if value is None:
        return MISSING, None
    if len(value) < _FIXED.size:
        return TRUNCATED, None
    magic, version, header_nbytes, crc, nbytes, *_ = _FIXED.unpack_from(value)  # the rest: compared below
    if magic != MAGIC or version != FORMAT_VERSION:
        return MISMATCH, None
    if header_nbytes + nbytes != len(value):
        return TRUNCATED, None
    if header_nbytes != fmt.header_nbytes or value[: header_nbytes] != fmt.header(block_hash, crc):
        return MISMATCH, None  # another dtype, shape or block
    payload = memoryview(value)[header_nbytes:]
    if checksum(payload) != crc:
        return CHECKSUM, None
    return HIT, payload
