"""Content names of full KV blocks: a chained SHA-256 over token ids.

A full block is named by H(parent, its token ids), where the parent is the name of the block
before it, so a name covers the whole prefix up to and including the block. The first block's
parent is the root, which folds in what else decides the KV content: the model and KV layout
(`model_fingerprint`, built by the caller) and an optional per-tenant `cache_salt`, so that
tenants with different salts never share blocks.

Names must agree across processes and machines (the Redis tier on other hosts looks blocks up by
them), so they are SHA-256 over an explicit byte encoding; never Python's `hash()` (salted per
process) nor pickle. The exact format, version 1:

    u32le(n)   = n as 4 bytes, little-endian, unsigned
    utf8(s)    = s encoded as UTF-8

    root_hash(fingerprint, salt) = SHA-256(
        b"longctx.kvcache.block_hash.v1"
        || u32le(len(utf8(fingerprint))) || utf8(fingerprint)
        || (b"\\x00"                                           if salt is None
            b"\\x01" || u32le(len(utf8(salt))) || utf8(salt)   otherwise)
    )

    hash_block(parent, tokens) = SHA-256(parent || u32le(tokens[0]) || ... || u32le(tokens[-1]))

Every name is the 32-byte raw digest. The parent is always 32 bytes, so the token count is implied
by the message length. Token ids must lie in [0, 2**32).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

import numpy as np

from protocol.token_ids import TOKEN_TYPECODE

HASH_FORMAT_TAG = b"longctx.kvcache.block_hash.v1"
HASH_NBYTES = 32
_TOKEN_NBYTES = 4

# array's unsigned typecode with 4-byte items on this platform ('I' on every platform we run on).
_U32_TYPECODE = next(code for code in "IL" if array(code).itemsize == _TOKEN_NBYTES)


def root_hash(model_fingerprint: str, cache_salt: str | None = None) -> bytes:
    """The parent of a sequence's first block."""
    message = bytearray(HASH_FORMAT_TAG)
    message += _length_prefixed(model_fingerprint)
    if cache_salt is None:
        message += b"\x00"
    else:
        message += b"\x01" + _length_prefixed(cache_salt)
    return hashlib.sha256(message).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The name of one block whose predecessor is named `parent`."""
    _check_parent(parent)
    return hashlib.sha256(parent + encode_token_ids(token_ids)).digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent: bytes) -> list[bytes]:
    """Names of every full block of `token_ids`, chained from `parent`; a partial tail is ignored.

    Every token id is range-checked, the tail's too. To extend a sequence's names, pass the
    tokens after its last full block with that block's name as `parent`.
    """
    # Encode the whole sequence rather than slice off the tail first: copying (and later freeing)
    # a 1M-element list costs more than encoding a few extra tokens.
    return hash_encoded_blocks(encode_token_ids(token_ids), block_size, parent)


def hash_encoded_blocks(encoded: bytes, block_size: int, parent: bytes) -> list[bytes]:
    """`hash_full_blocks` of token ids already encoded (`encode_token_ids`): a caller that needs
    the encoding anyway (a range check, a pickle) encodes once."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_parent(parent)
    num_tokens = len(encoded) // _TOKEN_NBYTES
    num_full_nbytes = num_tokens // block_size * block_size * _TOKEN_NBYTES
    return _chain_digests(parent, encoded, block_size * _TOKEN_NBYTES, num_full_nbytes)


def encode_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as consecutive little-endian uint32, the encoding both hashes above use."""
    if isinstance(token_ids, array) and token_ids.typecode == TOKEN_TYPECODE:
        return _encode_int64_array(token_ids)
    # One C-level conversion for the whole sequence; a per-token Python loop is ~10x slower.
    try:
        encoded = array(_U32_TYPECODE, token_ids)
    except OverflowError as exc:
        raise ValueError(f"token ids must be in [0, 2**32): {exc}") from None
    if sys.byteorder == "big":
        encoded.byteswap()
    return encoded.tobytes()


def _encode_int64_array(token_ids: array) -> bytes:
    """An int64 array (protocol/token_ids.py) narrowed by numpy in one pass: array's own
    conversion between typecodes walks it item by item (~1.5 ms for 33K ids on the CI machine)."""
    values = np.frombuffer(token_ids, dtype=np.int64) if token_ids else np.empty(0, dtype=np.int64)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << 32):
        raise ValueError("token ids must be in [0, 2**32)")
    return values.astype("<u4").tobytes()


def decode_token_ids(encoded: bytes) -> array:
    """The token ids that `encode_token_ids` encoded, as an int64 array (protocol/token_ids.py:
    no list for the garbage collector to walk); widened by numpy in one C pass."""
    widened = np.frombuffer(encoded, dtype="<u4").astype(np.int64)  # (tokens,)
    decoded = array(TOKEN_TYPECODE)
    decoded.frombytes(widened.tobytes())
    return decoded


def _chain_digests(parent: bytes, data: bytes, chunk_nbytes: int, end: int) -> list[bytes]:
    # The chain is inherently serial; this loop costs ~0.5 us per block, dominated by OpenSSL.
    sha256 = hashlib.sha256
    digests: list[bytes] = []
    digest = parent
    for start in range(0, end, chunk_nbytes):
        digest = sha256(digest + data[start : start + chunk_nbytes]).digest()
        digests.append(digest)
    return digests


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return len(encoded).to_bytes(_TOKEN_NBYTES, "little") + encoded


def _check_parent(parent: bytes) -> None:
    if len(parent) != HASH_NBYTES:
        raise ValueError(f"parent hash must be {HASH_NBYTES} bytes, got {len(parent)}")
