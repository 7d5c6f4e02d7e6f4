"""A request's token ids, held as `array("q")` (int64) wherever they live as long as the request.

A Python list of token ids is a container the garbage collector tracks: every collection of the
generation it sits in visits each element. A serving engine holds a few per request (the
scheduler's, the worker's, the message between them), so at 64 requests of 33K tokens a young
collection took 20-35 ms on an H100 host and ~100 ms of a 64-stream run went to them (session 17,
the `gc:` figures of bench/serve_load.py's engine lines; 200 such lists: 31 ms a collection on
the CI machine). An array holds no Python objects: the collector visits it in O(1), whatever its
length (200 such arrays: 0.015 ms). It also takes 8
bytes a token against ~36 for a list of ints (a 1M-token prompt: 8 against ~36 MB a copy).

Arrays index, slice (into arrays), append, extend and `len` like lists; they do not compare equal
to lists (`array("q", [1]) == [1]` is False): compare with `list(...)` or `.tolist()`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

TOKEN_TYPECODE = "q"


def token_array(values: Iterable[int]) -> array:
    """`values` as an int64 array: itself when it is one (not copied: a holder that appends to
    it takes a copy, `values[:]`), else converted once."""
    if isinstance(values, array) and values.typecode == TOKEN_TYPECODE:
        return values
    return array(TOKEN_TYPECODE, values)
