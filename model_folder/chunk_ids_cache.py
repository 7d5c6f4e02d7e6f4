"""Token ids of the chunks a tokenizer encoded lately, so that a re-asked long document is not
tokenized again (model_folder/chunked_encoding.py cuts long texts into chunks).

A chunk's ids depend on its text alone: each chunk starts and ends at a safe position (or at the
text's ends), where the tokenizer's output is provably cut too. So the ids found for a chunk's
text in one prompt are its ids in any other prompt. The key is the chunk's text itself, not a
digest of it: a dict compares the strings on a hash match, so two different chunks can never
share ids, whatever their hashes. Bounded by the tokens it holds, least recently used first out.
Any thread: the replica tokenizes prompts on a pool of threads.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence

# Token ids fit 32 bits (kvcache/block_hash.py encodes them so); 4 bytes an id, where a list of
# Python ints would take ~36.
_ID_TYPECODE = next(code for code in "IL" if array(code).itemsize == 4)

# ~4 documents of 1M tokens: ids 4 bytes a token plus the chunk's text (~4 characters a token,
# 1 byte each for ASCII), ~8 MB a million tokens, ~35 MB in all.
DEFAULT_MAX_TOKENS = 4 * 1024 * 1024


class ChunkIdsCache:
    """chunk text -> its token ids (no special tokens), least recently used dropped first."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.num_tokens = 0  # ids held, all entries together
        self.hits = self.misses = 0  # chunks found / not found, since the start
        self._entries: OrderedDict[str, array] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, chunk: str) -> array | None:
        """The chunk's ids, or None; a hit becomes the most recently used entry."""
        with self._lock:
            ids = self._entries.get(chunk)
            if ids is None:
                self.misses += 1
                return None
            self._entries.move_to_end(chunk)
            self.hits += 1
            return ids

    def put(self, chunk: str, token_ids: Sequence[int]) -> None:
        """Keeps the chunk's ids unless they alone exceed the bound; drops the oldest to fit."""
        ids = array(_ID_TYPECODE, token_ids)
        if len(ids) > self.max_tokens:
            return
        with self._lock:
            previous = self._entries.pop(chunk, None)
            if previous is not None:
                self.num_tokens -= len(previous)
            self._entries[chunk] = ids
            self.num_tokens += len(ids)
            while self.num_tokens > self.max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self.num_tokens -= len(dropped)
