r"""Exact, parallel tokenizing of long texts: cut them where the tokenizer's own output is cut too.

`tokenizers` encodes one text on one thread (~1.5 s per million tokens on a GPU node's core), the
whole time to first token of a re-asked, cached 1M-token document. `encode_batch_fast` encodes a
list of texts on all cores (Rust threads, without the GIL, and without the character offsets that
`encode` also computes). A long text is cut into chunks at *safe positions*, where the ids of the
pieces, put end to end, provably are the ids of the whole. The cuts follow the text, not its
length (`chunk_bounds`), so a document asked about again brings the same chunks, whose ids
`ChunkIdsCache` keeps: only the chunk where the new question starts is encoded again. A long text
of a tokenizer for which cutting cannot be argued is one call without offsets (one thread); a
short text is the plain single call.

## Why a cut is exact

`encode(text).ids` runs, for the byte-level BPE tokenizers accepted here (Llama 3, Qwen2,
DeepSeek-V3 and the make-model tokenizer, which copies Llama 3):

1. added tokens are matched on the raw text (leftmost-longest) and kept whole;
2. the normalizer (none or NFC) rewrites each remaining piece;
3. the pre-tokenizer splits it with regex `Split` stages (behavior Isolated: the matches and the
   gaps between them are the pieces), then maps bytes to characters (ByteLevel);
4. BPE encodes each pre-token alone: the ids are the pre-tokens' ids end to end;
5. the post-processor puts a fixed prefix first when asked (e.g. BOS), probed below.

So a cut at p is exact when the pieces of text[:p] followed by those of text[p:] are the pieces
of the text. A safe position p has text[p-1] == "\n" and text[p] a letter (`str.isalpha`). There:

- Added tokens: no content holds a "\n" (checked), so every match lies on one side of p; the
  candidates that start before p end before the "\n", the same in text and text[:p], so the
  leftmost-longest scan picks the same ones, then restarts at p. lstrip and rstrip are refused
  (they widen a match over whitespace, the "\n" included); single_word looks at the neighbours
  of a match, and a "\n" is no word character, like a text's end.
- NFC: "\n" is a starter (combining class 0) in no canonical composition, so
  NFC(a + "\n" + b) == NFC(a + "\n") + NFC(b) for any a and b, and no letter's normalization
  starts with a space.
- The regexes (each alternative is spelled out beside its pattern below) share three properties.
  (i) In a match, whatever follows a "\n" is whitespace: "\n" sits only in whitespace runs or in
  a trailing `[\r\n]*`; so the letter at p never joins the "\n" before it, and p is a boundary
  (this needs no more than a non-space at p: Python's and the regex engine's Unicode tables need
  not agree on what a letter is). (ii) No lookbehind and no anchors: matching restarted at p
  finds what the whole text's scan finds from p. (iii) The one lookahead, `\s+(?!\S)`, never
  decides a piece that ends at p: where `\s+` could run up to p (whitespace ending with the
  "\n"), the earlier alternative `\s*[\r\n]+` already takes that run; so text[:p], where the
  lookahead would see the end instead of a letter, splits as the whole text does before p. A
  stage that never matches a "\n" (DeepSeek's digits and CJK stages) may leave p inside a gap;
  the next stage then sees the same characters around p, and the last stage makes p a boundary.
- BPE without dropout is a function of the pre-token alone, and neither truncation nor padding
  (they would act on each chunk) is set. The post-processor's prefix is probed:
  encode(x, True) == encode("", True) + encode(x, False) for probe texts x, and only
  TemplateProcessing and ByteLevel (offsets only) are accepted.

GPT-2's pattern (also ByteLevel with use_regex=True) is left out, failing (iii): its `\s+(?!\S)`
comes before any newline alternative, so "a  \nb" gives "a", "  ", "\n", "b" while "a  \n" gives
"a", "  \n". On top of the argument, every accepted tokenizer must encode a probe text with
added tokens, CJK, accents, "\r\n" and whitespace runs to the same ids when it is cut at all
its safe positions.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from model_folder.chunk_ids_cache import ChunkIdsCache
from model_folder.tokenizer_training import LLAMA3_SPLIT_PATTERN

logger = logging.getLogger(__name__)

# Below this many characters (~16K tokens, ~25 ms on one core) a text is encoded in one call:
# most prompts stay on exactly the path they always took. Above it, at least 4 chunks: the cores
# share them, and a re-asked document (a 32K-token one took ~50 ms to tokenize) is cached.
MIN_CHUNKED_TEXT_CHARS = 64 * 1024
# Chunks are cut where the text says, not where its length says: each cut is the first safe
# position at least this many characters after the one before, so two prompts that share a
# document share its chunks (ChunkIdsCache finds them), whatever follows it. ~4-8K tokens a
# chunk: its hand-off to a thread costs microseconds, a 1M-token text makes ~250 chunks for the
# cores to share (they differ in cost: CJK, digits), and a re-asked document re-encodes only
# the chunk its question starts in.
CHUNK_CHARS = 16 * 1024

# Qwen2's (and Qwen2.5's, Qwen3's) tokenizer.json: Llama 3's with single digits.
#   contractions | [^\r\n\p{L}\p{N}]?\p{L}+ : the optional prefix excludes \r\n
#   | ?[^\s\p{L}\p{N}]+[\r\n]* : newlines only at its end | \s*[\r\n]+ | \s+(?!\S) | \s+
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek-V3's tokenizer.json (also V3.2's and V4's): three Split stages before ByteLevel. The
# published file spells \r and \n inside the last pattern's classes as the characters themselves.
#   digit groups; runs of CJK ideographs and kana (neither matches a "\n");
#   punctuation + ASCII letters | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ : the prefix excludes \r\n
#   | ?[\p{P}\p{S}]+[\r\n]* : newlines only at its end | \s*[\r\n]+ | \s+(?!\S) | \s+
DEEPSEEK_V3_SPLIT_PATTERNS = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    (
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
# The Split stages (in order) whose cuts are argued in the module docstring. Llama 3's pattern is
# the make-model tokenizer's own (model_folder/tokenizer_training.py), copied from Llama 3's file.
KNOWN_SPLIT_STAGES = {
    "llama3": (LLAMA3_SPLIT_PATTERN,),
    "qwen2": (QWEN2_SPLIT_PATTERN,),
    "deepseek-v3": DEEPSEEK_V3_SPLIT_PATTERNS,
}

# A "\n" and the character after it; `str.isalpha` then decides (this class also takes numerals
# such as "½", which are no letters).
_NEWLINE_BEFORE_WORD_CHARACTER = re.compile(r"\n(?=[^\W\d_])")
_PROBE_TEXT = (
    "It's a naïve café's résumé!\n\nNext paragraph 12345\r\nWindows line\n  \n\tTabbed\n"
    "東京は首都です。\n北京\nÀ e\u0301 n\u0303o\n?!\nword\n\n\nEnd 'll ok 42 \t \nafter spaces\n"
)


class ChunkedEncoder:
    """A tokenizer's `encode`: long texts in parallel chunks where that is provably exact, the ids
    of chunks seen lately taken from `cache` (a re-asked document).

    Whether it is exact is decided once, on the first long text (short ones never pay for it)."""

    def __init__(self, backend: BackendTokenizer, cache: ChunkIdsCache | None = None,
                 chunk_chars: int = CHUNK_CHARS, min_text_chars: int = MIN_CHUNKED_TEXT_CHARS):  # fmt: skip
        self.backend = backend
        self.cache = cache if cache is not None else ChunkIdsCache()
        self.chunk_chars = chunk_chars
        self.min_text_chars = min_text_chars

    @functools.cached_property
    def ineligible_reason(self) -> str | None:
        reason = ineligibility_reason(self.backend)
        if reason is not None:
            logger.debug("long texts are encoded in one call: %s", reason)
        return reason

    @functools.cached_property
    def special_prefix(self) -> tuple[int, ...] | None:
        return fixed_special_prefix(self.backend)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Exactly `backend.encode(text, add_special_tokens).ids`."""
        if len(text) < self.min_text_chars:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if not self._may_chunk(add_special_tokens):
            # One text, one thread; without the character offsets, about half the work.
            return _encode_batch(self.backend)([text], add_special_tokens=add_special_tokens)[0].ids
        prefix = self.special_prefix if add_special_tokens else ()
        return encode_in_chunks(self.backend, text, prefix, self.chunk_chars, self.cache)

    def _may_chunk(self, add_special_tokens: bool) -> bool:
        if self.ineligible_reason is not None:
            return False
        return not add_special_tokens or self.special_prefix is not None


def encode_in_chunks(backend: BackendTokenizer, text: str, prefix: Sequence[int], chunk_chars: int = CHUNK_CHARS,
                     cache: ChunkIdsCache | None = None) -> list[int]:  # fmt: skip
    """`prefix` then the ids of `text` without special tokens, from its chunks (`chunk_bounds`):
    those in `cache` from there, the others encoded in one parallel batch (and cached). Exact
    only for a backend that `ineligibility_reason` accepts."""
    bounds = chunk_bounds(text, chunk_chars)
    chunks = [text[start:end] for start, end in pairwise(bounds)]
    known = [cache.get(chunk) if cache is not None else None for chunk in chunks]
    missing = [chunk for chunk, ids in zip(chunks, known) if ids is None]
    encoded = iter(_encode_batch(backend)(missing, add_special_tokens=False) if missing else ())
    ids = list(prefix)
    for chunk, chunk_ids in zip(chunks, known):
        if chunk_ids is None:
            chunk_ids = next(encoded).ids
            if cache is not None:
                cache.put(chunk, chunk_ids)
        ids.extend(chunk_ids)
    return ids


def _ids_of_chunks(backend: BackendTokenizer, text: str, bounds: list[int]) -> list[int]:
    """The ids of text[bounds[0]:bounds[1]], text[bounds[1]:bounds[2]], ... end to end, encoded in
    one parallel batch without special tokens."""
    chunks = [text[start:end] for start, end in pairwise(bounds)]
    ids: list[int] = []
    for encoding in _encode_batch(backend)(chunks, add_special_tokens=False):
        ids.extend(encoding.ids)
    return ids


def _encode_batch(backend: BackendTokenizer) -> Callable[..., list]:
    """encode_batch_fast (tokenizers >= 0.20) leaves out the character offsets, about half the
    work; the ids are the same. Rust threads, without the GIL."""
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


def chunk_bounds(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """0, the cuts, len(text). Each cut is the first safe position at least `chunk_chars` after
    the one before; without one, the rest is the last chunk. A cut depends on the text up to it
    alone: texts that share a prefix share the chunks that end inside it."""
    bounds = [0]
    while (cut := first_safe_position(text, bounds[-1] + chunk_chars)) is not None:
        bounds.append(cut)
    bounds.append(len(text))
    return bounds


def first_safe_position(text: str, start: int) -> int | None:
    """The first p >= start with text[p - 1] == "\\n" and text[p] a letter, or None."""
    search_from = max(start - 1, 0)  # the "\n" sits just before p
    while (match := _NEWLINE_BEFORE_WORD_CHARACTER.search(text, search_from)) is not None:
        if text[match.end()].isalpha():
            return match.end()
        search_from = match.end()
    return None


def safe_positions(text: str) -> list[int]:
    """Every safe position of a (short) text."""
    positions, start = [], 1
    while (position := first_safe_position(text, start)) is not None:
        positions.append(position)
        start = position + 1
    return positions


def fixed_special_prefix(backend: BackendTokenizer) -> tuple[int, ...] | None:
    """The ids that add_special_tokens=True puts before any text, or None when it adds anything
    else (a suffix, ids that depend on the text)."""
    prefix = backend.encode("", add_special_tokens=True).ids
    for probe in ("a", "Hello world\nNext", _probe_text(backend)):
        with_special = backend.encode(probe, add_special_tokens=True).ids
        if with_special != prefix + backend.encode(probe, add_special_tokens=False).ids:
            return None
    return tuple(prefix)


def ineligibility_reason(backend: BackendTokenizer) -> str | None:
    """Why cutting a text at its safe positions may change this tokenizer's ids; None if it cannot."""
    checks = (_model_reason, _settings_reason, _added_tokens_reason, _normalizer_reason,
              _pre_tokenizer_reason, _post_processor_reason, _probe_reason)  # fmt: skip
    for check in checks:
        try:
            reason = check(backend)
        except Exception as error:  # noqa: BLE001 - a component that cannot be read is not argued for
            reason = f"{check.__name__.removeprefix('_').removesuffix('_reason')}: cannot be read ({error})"
        if reason is not None:
            return reason
    return None


def _model_reason(backend: BackendTokenizer) -> str | None:
    if not isinstance(backend.model, models.BPE):
        return f"the model is {type(backend.model).__name__}, not BPE"
    if backend.model.dropout:
        return "BPE dropout picks merges at random"
    return None


def _settings_reason(backend: BackendTokenizer) -> str | None:
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding applies to each chunk"
    return None


def _added_tokens_reason(backend: BackendTokenizer) -> str | None:
    for token in backend.get_added_tokens_decoder().values():
        if "\n" in token.content:
            return f"added token {token.content!r} holds a newline"
        if token.lstrip or token.rstrip:
            return f"added token {token.content!r} strips whitespace beside it"
    return None


def _normalizer_reason(backend: BackendTokenizer) -> str | None:
    normalizer = _component_json(backend.normalizer)
    return None if _is_nfc_or_nothing(normalizer) else f"normalizer {normalizer} is neither none nor NFC"


def _is_nfc_or_nothing(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None or normalizer["type"] == "NFC":
        return True
    return normalizer["type"] == "Sequence" and all(map(_is_nfc_or_nothing, normalizer["normalizers"]))


def _pre_tokenizer_reason(backend: BackendTokenizer) -> str | None:
    pre_tokenizer = _component_json(backend.pre_tokenizer)
    is_sequence = pre_tokenizer is not None and pre_tokenizer["type"] == "Sequence"
    stages = pre_tokenizer["pretokenizers"] if is_sequence else [pre_tokenizer]
    if not stages or not _is_plain_byte_level(stages[-1]):
        return f"the pre-tokenizer does not end with ByteLevel without prefix space or regex: {pre_tokenizer}"
    if tuple(map(_split_pattern, stages[:-1])) not in KNOWN_SPLIT_STAGES.values():
        return f"the pre-tokenizer's Split stages are none of {sorted(KNOWN_SPLIT_STAGES)}: {stages[:-1]}"
    return None


def _is_plain_byte_level(stage: dict[str, Any] | None) -> bool:
    """Bytes mapped to characters, nothing split or added (use_regex would apply GPT-2's split)."""
    if stage is None or stage["type"] != "ByteLevel":
        return False
    return stage.get("add_prefix_space") is False and stage.get("use_regex") is False


def _split_pattern(split: dict[str, Any]) -> str | None:
    """An isolating Split's regex, with \\r and \\n spelled as escapes; None for any other stage."""
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    regex = split["pattern"].get("Regex")
    return regex.replace("\r", r"\r").replace("\n", r"\n") if regex is not None else None


def _post_processor_reason(backend: BackendTokenizer) -> str | None:
    kinds = _post_processor_kinds(_component_json(backend.post_processor))
    unknown = kinds - {"TemplateProcessing", "ByteLevel"}
    return f"post-processor {sorted(unknown)} is not argued for" if unknown else None


def _post_processor_kinds(processor: dict[str, Any] | None) -> set[str]:
    if processor is None:
        return set()
    if processor["type"] == "Sequence":
        return set().union(*map(_post_processor_kinds, processor["processors"]))
    return {processor["type"]}


def _probe_reason(backend: BackendTokenizer) -> str | None:
    """The argument, checked: the probe text encodes the same when cut at all its safe positions."""
    text = _probe_text(backend)
    cut = _ids_of_chunks(backend, text, [0, *safe_positions(text), len(text)])
    if cut != backend.encode(text, add_special_tokens=False).ids:
        return "the probe text encodes differently when cut at its safe positions"
    return None


def _probe_text(backend: BackendTokenizer) -> str:
    """A short text with safe positions of every kind, and (some of) the added tokens before them."""
    added = sorted(token.content for token in backend.get_added_tokens_decoder().values())[:64]
    return _PROBE_TEXT + "".join(f"{content}\nline after {content}\n" for content in added)


def _component_json(component: Any) -> dict[str, Any] | None:
    """A pipeline component's tokenizer.json entry (its pickled state), without the vocabulary
    that `to_str()` would also serialize (megabytes for a 128K-token tokenizer)."""
    return None if component is None else json.loads(component.__getstate__())
