"""Encoding a block for Redis runs on the tiers' I/O threads while the engine steps on its own
thread: the payload copy must not hold the GIL (session 15: a bytearray slice assignment held it
~2 ms a 1 MiB block, and a lone prompt's step took 9.7 ms against 4.3 with nothing writing)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from model_shards.kv_io.block_seal import TAG_NBYTES
from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block_into
from protocol.kv_transfer_ops import CHECKSUM, HIT, MISMATCH

BLOCK_BYTES = 32 << 20  # large enough that one copy spans many of the step thread's turns
FMT = BlockFormat("bfloat16", (1, 2, 1, 1, BLOCK_BYTES // 4), BLOCK_BYTES)


class FixedSeal:
    """A seal that reads nothing: crc32 releases the GIL itself, and would hide a copy that holds it."""

    kind, failed, other_kind = 0, CHECKSUM, MISMATCH

    def tag(self, header, payload) -> bytes:
        return bytes(TAG_NBYTES)


def test_encoding_lets_another_thread_run_during_the_payload_copy():
    """With a 10 s switch interval a thread that keeps the GIL is never made to give it up: the
    step-like loop here runs only while the encoding thread is inside a GIL-free copy."""
    payload = np.random.default_rng(0).integers(0, 255, BLOCK_BYTES, dtype=np.uint8)
    out = bytearray(FMT.header_nbytes + FMT.nbytes)
    done = threading.Event()
    turns_while_encoding = 0

    def encode_many():
        for _ in range(6):
            encode_block_into(FMT, b"\x01" * 32, payload, out, FixedSeal())
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        encoder = threading.Thread(target=encode_many)
        encoder.start()
        while not done.is_set():
            time.sleep(0)  # gives the GIL up and asks for it back, as a CUDA call does
            turns_while_encoding += 1
        encoder.join()
    finally:
        sys.setswitchinterval(interval)
    assert turns_while_encoding >= 6
    outcome, decoded = decode_block(FMT, b"\x01" * 32, bytes(out), FixedSeal())
    assert outcome == HIT and np.array_equal(np.frombuffer(decoded, np.uint8), payload)
