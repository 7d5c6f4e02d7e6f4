"""Block names: pinned byte format, stable across processes, separated by model and tenant."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from array import array

import pytest

from kvcache.block_hash import hash_block, hash_full_blocks, root_hash

FINGERPRINT = "llama-3.1-8b|bf16|kv:32x8x128|block16"
ROOT = root_hash(FINGERPRINT, "tenant-a")


def test_root_and_block_hashes_match_the_pinned_v1_digests():
    # Changing these digests breaks every prefix cache and Redis tier in the fleet: bump the
    # format tag in block_hash.py instead.
    assert ROOT.hex() == "92bc6106c80f07f5b40bd6907b4f64a36d252ebe66db27935fa1ae4c21c6700d"
    assert root_hash(FINGERPRINT).hex() == (
        "977b12d7421577eceec705df906a9991c36d78b62ea293918494b3038bae0d85"
    )
    assert [h.hex() for h in hash_full_blocks(list(range(40)), 16, ROOT)] == [
        "81a81c641162bdb4a78d7ec020b09332b0f88c6d8a1a20d8c81ee09ab0259847",
        "89cd101727ce1b75ed2f9fbe1977762567f1461859c652d4d9e6ff4483661774",
    ]


def test_hashes_follow_the_documented_byte_format():
    # An independent restatement of the module docstring, as the Redis tier would implement it.
    fingerprint, salt = FINGERPRINT.encode(), b"tenant-a"
    root = hashlib.sha256(
        b"longctx.kvcache.block_hash.v1"
        + struct.pack("<I", len(fingerprint)) + fingerprint
        + b"\x01" + struct.pack("<I", len(salt)) + salt
    ).digest()
    first = hashlib.sha256(root + struct.pack("<16I", *range(16))).digest()
    second = hashlib.sha256(first + struct.pack("<16I", *range(16, 32))).digest()
    assert root == ROOT
    assert hash_full_blocks(list(range(40)), 16, ROOT) == [first, second]


def test_hashes_are_identical_in_another_process_with_another_hash_seed():
    tokens = list(range(1000, 1100))
    script = (
        "import json, sys; from kvcache.block_hash import hash_full_blocks, root_hash; "
        "tokens, fp, salt = json.loads(sys.argv[1]); "
        "print(' '.join(h.hex() for h in hash_full_blocks(tokens, 16, root_hash(fp, salt))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps([tokens, FINGERPRINT, "tenant-a"])],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout.split() == [h.hex() for h in hash_full_blocks(tokens, 16, ROOT)]


def test_fingerprint_and_salt_each_change_every_block_hash():
    tokens = list(range(64))
    roots = [
        root_hash(FINGERPRINT),
        root_hash(FINGERPRINT, "tenant-a"),
        root_hash(FINGERPRINT, "tenant-b"),
        root_hash(FINGERPRINT, ""),  # an empty salt is still a salt
        root_hash(FINGERPRINT + "x"),
    ]
    hashes = [hash_full_blocks(tokens, 16, root) for root in roots]
    assert len(set(roots)) == len(roots)
    assert len({h for block_hashes in hashes for h in block_hashes}) == 4 * len(roots)


def test_each_block_hash_covers_the_whole_prefix_before_it():
    a = hash_full_blocks([1] * 16 + [2] * 16, 16, ROOT)
    b = hash_full_blocks([3] * 16 + [2] * 16, 16, ROOT)
    assert a[1] != b[1]  # same second block, different first block


def test_full_block_hashes_chain_like_hash_block_and_ignore_the_partial_tail():
    tokens = list(range(50))
    expected, parent = [], ROOT
    for start in (0, 16, 32):
        parent = hash_block(parent, tokens[start : start + 16])
        expected.append(parent)
    assert hash_full_blocks(tokens, 16, ROOT) == expected
    assert hash_full_blocks(tokens[:15], 16, ROOT) == []
    assert hash_full_blocks(tuple(tokens), 16, ROOT) == expected
    assert hash_full_blocks(array("I", tokens), 16, ROOT) == expected


def test_hashing_continues_from_the_last_full_block_hash():
    tokens = list(range(100))
    whole = hash_full_blocks(tokens, 8, ROOT)
    head = hash_full_blocks(tokens[:40], 8, ROOT)
    assert head + hash_full_blocks(tokens[40:], 8, head[-1]) == whole


@pytest.mark.parametrize("bad_token", [-1, 2**32])
def test_token_ids_outside_uint32_are_rejected(bad_token):
    with pytest.raises(ValueError, match="token ids"):
        hash_full_blocks([0] * 15 + [bad_token], 16, ROOT)
    with pytest.raises(ValueError, match="token ids"):
        hash_full_blocks([0] * 16 + [bad_token], 16, ROOT)  # in the partial tail
    with pytest.raises(ValueError, match="token ids"):
        hash_block(ROOT, [bad_token])


def test_token_id_bounds_are_inclusive_of_zero_and_2_pow_32_minus_1():
    assert len(hash_full_blocks([0, 2**32 - 1], 2, ROOT)) == 1


def test_bad_block_size_or_parent_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        hash_full_blocks([1, 2], 0, ROOT)
    with pytest.raises(ValueError, match="parent"):
        hash_full_blocks([1, 2], 2, ROOT[:16])
