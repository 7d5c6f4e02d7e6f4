"""Authenticated KV blocks in Redis: with a MAC key, a forged, swapped or replayed block is a
counted miss and never changes an output (issue 17, finding 4). Against real redis-servers."""

from __future__ import annotations

import zlib

import pytest

from cluster.config import KVTierSettings
from engine.offline import generate
from model_shards.kv_io.block_seal import CHECKSUM_SEAL, MacSeal, seal_for
from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block
from protocol.kv_transfer_ops import CHECKSUM, HIT, MISMATCH, UNAUTHENTIC
from test_tiers_engine import GREEDY, redis_engine, reference  # noqa: F401 (reference: a fixture)
from tier_helpers import block_hashes, document, metric

FMT = BlockFormat("float16", (2, 2, 4, 2, 8), 2 * 2 * 4 * 2 * 8 * 2)
HASH, OTHER_HASH = b"\x11" * 32, b"\x22" * 32
KEY = "correct horse battery staple"
NAMESPACE = b"longctx:kv:v2:aaaa:"
SEAL = MacSeal(KEY.encode(), NAMESPACE)


def _payload(fill: int) -> bytes:
    return bytes([fill]) * FMT.nbytes


def _header_nbytes(value: bytes) -> int:
    return int.from_bytes(value[6:8], "little")


def test_a_sealed_block_verifies_only_as_itself_under_the_same_key_and_namespace():
    value = encode_block(FMT, HASH, _payload(3), SEAL)
    outcome, payload = decode_block(FMT, HASH, value, SEAL)
    assert outcome == HIT and bytes(payload) == _payload(3)
    forged = bytearray(value)
    forged[-5] ^= 0x01  # one payload bit, the tag left as it was
    assert decode_block(FMT, HASH, bytes(forged), SEAL)[0] == UNAUTHENTIC
    recomputed_crc = encode_block(FMT, HASH, bytes(forged[_header_nbytes(value):]), CHECKSUM_SEAL)
    assert decode_block(FMT, HASH, recomputed_crc, SEAL)[0] == UNAUTHENTIC  # the attack of finding 4
    assert decode_block(FMT, HASH, value, MacSeal(b"another key, 16+ bytes", NAMESPACE))[0] == UNAUTHENTIC
    assert decode_block(FMT, HASH, value, MacSeal(KEY.encode(), b"longctx:kv:v2:bbbb:"))[0] == UNAUTHENTIC
    assert decode_block(FMT, OTHER_HASH, value, SEAL)[0] == MISMATCH  # swapped: the header names the block
    relabelled = bytearray(value)
    relabelled[17:49] = OTHER_HASH  # swapped, the header rewritten to match its new key
    assert decode_block(FMT, OTHER_HASH, bytes(relabelled), SEAL)[0] == UNAUTHENTIC
    assert decode_block(FMT, HASH, value, CHECKSUM_SEAL)[0] == MISMATCH  # a reader without the key


def test_without_a_key_a_recomputed_crc32_passes_which_is_why_shared_redis_needs_one():
    value = encode_block(FMT, HASH, _payload(3))
    assert decode_block(FMT, HASH, encode_block(FMT, HASH, _payload(9)))[0] == HIT
    damaged = bytearray(value)
    damaged[-1] ^= 0x01
    assert decode_block(FMT, HASH, bytes(damaged))[0] == CHECKSUM


def test_shared_redis_requires_a_key_of_at_least_16_bytes(tmp_path):
    with pytest.raises(ValueError, match="redis_mac_key"):
        KVTierSettings(host_bytes=1 << 20, redis_urls=("redis://127.0.0.1:1",), redis_shared=True)
    with pytest.raises(ValueError, match="16"):
        KVTierSettings(redis_mac_key="short")
    key_file = tmp_path / "mac-key"
    key_file.write_text(KEY + "\n")
    settings = KVTierSettings(host_bytes=1 << 20, redis_urls=("redis://127.0.0.1:1",), redis_shared=True,
                              redis_mac_key_file=str(key_file))
    seal = seal_for(settings.redis_mac_key, settings.redis_mac_key_file, NAMESPACE)
    assert decode_block(FMT, HASH, encode_block(FMT, HASH, _payload(1), SEAL), seal)[0] == HIT
    assert seal_for(None, None, NAMESPACE) is CHECKSUM_SEAL
    with pytest.raises(ValueError, match="cannot read"):
        seal_for(None, str(tmp_path / "missing"), NAMESPACE)


def _values(client, engine, prompt) -> list[tuple[bytes, bytes]]:
    """(Redis key, value) of each full block of the prompt, in block order."""
    keys = {key[-64:]: key for key in client.scan_iter(count=10_000)}
    hashes = [block_hash.hex().encode() for block_hash in block_hashes(engine, prompt)]
    return [(keys[h], client.get(keys[h])) for h in hashes]


def test_a_forged_block_is_a_counted_miss_and_changes_no_output(tier_model_dir, redis_server, reference):
    doc = document(1000, seed=7)  # 15 full blocks of 64
    writer = redis_engine(tier_model_dir, redis_server.url, redis_mac_key=KEY)
    generate(writer, [doc], GREEDY)
    client = redis_server.client()
    values = _values(client, writer, doc)
    fmt = writer.executor.worker.kv_transfer.format
    other_payload = values[9][1][_header_nbytes(values[9][1]):]  # real KV, of another block
    client.set(values[5][0], encode_block(fmt, block_hashes(writer, doc)[5], other_payload))  # crc32 recomputed
    reader = redis_engine(tier_model_dir, redis_server.url, redis_mac_key=KEY)
    result = generate(reader, [doc], GREEDY)[0][0]
    assert result.num_redis_hit_tokens == 5 * 64  # blocks 0-4; 5 is refused, 6.. are past the break
    assert metric(reader, "longctx_kv_unauthentic_blocks_total") == 1
    assert metric(reader, "longctx_kv_redis_fetches_total", {"outcome": "unauthentic"}) == 1
    assert result.token_ids == reference([doc])[0]


def test_a_block_replayed_from_another_checkpoint_s_namespace_is_refused(
        tier_model_dir, other_checkpoint_dir, redis_server, reference):
    """Two fine-tunes of one architecture name their blocks alike; only the key prefix differs.
    Copying one's values under the other's keys must not feed it the wrong weights' KV."""
    doc = document(700, seed=8)
    source = redis_engine(other_checkpoint_dir, redis_server.url, redis_mac_key=KEY)
    generate(source, [doc], GREEDY)
    client = redis_server.client()
    copied = _values(client, source, doc)
    target = redis_engine(tier_model_dir, redis_server.url, redis_mac_key=KEY)
    target_prefix = target.executor.worker.kv_transfer.remote.store._prefix
    for key, value in copied:
        client.set(target_prefix + key[-64:], value)
    result = generate(target, [doc], GREEDY)[0][0]
    assert result.num_redis_hit_tokens == 0
    assert metric(target, "longctx_kv_unauthentic_blocks_total") == len(copied) == 10  # each fetched, each refused
    assert result.token_ids == reference([doc])[0]


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it():
    """Blocks written by a worker with ISA-L's crc32 verify on one with zlib's, and back: the
    value format does not depend on the library."""
    payload = bytes(range(256)) * 4096 + b"tail"
    tag = CHECKSUM_SEAL.tag(b"header", memoryview(payload))
    assert tag[:4] == zlib.crc32(payload).to_bytes(4, "little") and tag[4:] == bytes(28)
