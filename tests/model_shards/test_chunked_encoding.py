"""model_folder/chunked_encoding.py: a long text cut at safe positions encodes to exactly the ids of
one `encode` call, for each whitelisted pre-tokenizer; every other tokenizer gets the one call."""

from __future__ import annotations

import random
import unicodedata
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from model_folder.chunk_ids_cache import ChunkIdsCache
from model_folder.chunked_encoding import (
    CHUNK_CHARS,
    DEEPSEEK_V3_SPLIT_PATTERNS,
    MIN_CHUNKED_TEXT_CHARS,
    QWEN2_SPLIT_PATTERN,
    ChunkedEncoder,
    chunk_bounds,
    first_safe_position,
    fixed_special_prefix,
    ineligibility_reason,
    safe_positions,
)
from model_folder.tokenizer import Tokenizer as FolderTokenizer
from model_folder.tokenizer_training import LLAMA3_SPLIT_PATTERN, trained_tokenizer_json

LONG_TEXT_CHARS = MIN_CHUNKED_TEXT_CHARS + 60_000
WORDS = ["the", "Fox", "naïve", "café", "résumé", "Goethe", "über", "Ça", "niño", "Москва", "ελληνικά", "東京",
         "한국어", "مرحبا", "हिन्दी", "x", "I", "A"]  # fmt: skip
# What goes between fragments: mostly spaces, and newlines of every kind next to anything.
SEPARATORS = ["", " ", " ", " ", " ", "\n", "\n", "\n\n", "\r\n", "  \n", " \n ", "\t", "\n\t", "   ", "\n\n\n",
              "\r", "\n ", "\t\n", "\u00a0\n"]  # fmt: skip


def adversarial_text(seed: int, num_chars: int, specials: list[str]) -> str:
    """Words, digit runs, CJK, accents and combining marks, Hangul jamo (NFC composes them),
    punctuation runs, contractions, odd spaces and the tokenizer's special-token strings, joined by
    spaces, tabs, "\\r\\n" and runs of newlines."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < num_chars:
        part = _fragment(rng, specials) + rng.choice(SEPARATORS)
        parts.append(part)
        length += len(part)
    return "".join(parts)


def _fragment(rng: random.Random, specials: list[str]) -> str:
    kinds = [
        lambda: rng.choice(WORDS),
        lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDE") for _ in range(rng.randint(1, 9))),
        lambda: str(rng.randrange(10 ** rng.randint(1, 8))),
        lambda: "".join(rng.choice("東京北京日本語中文アイウエオかきくけこ") for _ in range(rng.randint(1, 6))),
        lambda: rng.choice("aeioAEIO") + "".join(rng.choices("\u0300\u0301\u0303\u0308\u0327", k=rng.randint(0, 3))),
        lambda: rng.choice(["\u1100\u1161\u11a8", "\u1100\u1161", "\u1161", "\u11a8", "\u0301", "\u0308e"]),
        lambda: "".join(rng.choice("!?.,;:-()[]{}\"'/\\@#$%^&*_`~") for _ in range(rng.randint(1, 5))),
        lambda: rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'"]),
        lambda: rng.choice(specials),
        lambda: rng.choice(["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "½", "Ⅻ", "²", "\u00a0", "\u2028", "\x85", "\u3000",
                            "\x0b", "\x0c", "\x00"]),
    ]  # fmt: skip
    return rng.choices(kinds, weights=[30, 20, 8, 8, 6, 3, 8, 4, 2, 4])[0]()


def specials_of(backend: Tokenizer) -> list[str]:
    return [token.content for token in backend.get_added_tokens_decoder().values()]


def trained(pre_tokenizer, normalizer, specials: list[str], post_processor=None) -> Tokenizer:
    """A small byte-level BPE with this pre-tokenizer, trained on adversarial text (so that its
    merges join spaces, newlines and punctuation the way a real vocabulary does)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator([adversarial_text(7, 120_000, specials)], trainer)
    if post_processor is not None:
        tokenizer.post_processor = post_processor(tokenizer)
    return tokenizer


def llama3() -> Tokenizer:
    return Tokenizer.from_str(trained_tokenizer_json(4096))


def qwen2() -> Tokenizer:
    """Qwen2's file: NFC, its Split, ByteLevel; no BOS."""
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    return trained(pre_tokenizer, normalizers.NFC(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   lambda tokenizer: processors.ByteLevel(trim_offsets=False))  # fmt: skip


def deepseek_v3() -> Tokenizer:
    """DeepSeek-V3's file: an empty normalizer Sequence, three Splits (the last one with \\r and \\n
    written as the characters, as the published file has them), ByteLevel, a BOS template."""
    *first, last = DEEPSEEK_V3_SPLIT_PATTERNS
    patterns = [*first, last.replace(r"\r\n", "\r\n")]
    pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in patterns),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bos = "<｜begin▁of▁sentence｜>"
    return trained(pre_tokenizer, normalizers.Sequence([]), [bos, "<｜end▁of▁sentence｜>", "<｜User｜>"],
                   lambda tokenizer: processors.TemplateProcessing(
                       single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]))  # fmt: skip


WHITELISTED = {"llama3": llama3, "qwen2": qwen2, "deepseek-v3": deepseek_v3}


@pytest.fixture(scope="module", params=sorted(WHITELISTED))
def backend(request) -> Tokenizer:
    return WHITELISTED[request.param]()


@pytest.fixture(scope="module")
def long_text(backend) -> str:
    return adversarial_text(11, LONG_TEXT_CHARS, specials_of(backend))


class SpyBackend:
    """A backend that records how it was asked to encode (the Rust object takes no attributes)."""

    def __init__(self, backend: Tokenizer):
        self._backend = backend
        self.calls: list[tuple[str, int, int]] = []  # (method, texts, characters in all)

    def encode(self, text, add_special_tokens=True):
        self.calls.append(("encode", 1, len(text)))
        return self._backend.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch_fast(self, texts, add_special_tokens=True):
        self.calls.append(("encode_batch_fast", len(texts), sum(map(len, texts))))
        return self._backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    def calls_for(self, text: str) -> list[tuple[str, int]]:
        """(method, texts) of the calls that encoded `text`, not the eligibility probes' short texts."""
        return [(method, count) for method, count, chars in self.calls if chars == len(text)]

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_whitelisted_tokenizers_are_eligible_with_their_prefix(backend):
    assert ineligibility_reason(backend) is None
    prefix = backend.encode("", add_special_tokens=True).ids
    assert fixed_special_prefix(backend) == tuple(prefix) and len(prefix) <= 1


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_a_long_adversarial_text_encodes_exactly_in_several_chunks(backend, long_text, add_special_tokens):
    spy = SpyBackend(backend)
    ids = ChunkedEncoder(spy).encode(long_text, add_special_tokens)
    assert ids == backend.encode(long_text, add_special_tokens=add_special_tokens).ids
    num_chunks = len(chunk_bounds(long_text)) - 1
    assert num_chunks >= len(long_text) // (2 * CHUNK_CHARS)
    assert spy.calls_for(long_text) == [("encode_batch_fast", num_chunks)]  # the cuts were used, not a fallback


def test_a_document_asked_about_again_encodes_only_the_chunk_its_question_starts_in(backend, long_text):
    spy, cache = SpyBackend(backend), ChunkIdsCache()
    encoder = ChunkedEncoder(spy, cache)
    encoder.encode(long_text)
    assert len(cache) == len(chunk_bounds(long_text)) - 1 and cache.hits == 0
    spy.calls.clear()
    assert encoder.encode(long_text) == backend.encode(long_text).ids  # every chunk from the cache
    assert spy.calls == []
    for question in ("\nWhat does the third clause say?", "\nAnd the fourth one?\nAnswer briefly."):
        asked = long_text + question
        assert encoder.encode(asked) == backend.encode(asked).ids
        # Encoded: from the document's last cut on (one chunk, or two if the question's "\n" is a cut).
        [(method, _, chars)] = spy.calls
        assert method == "encode_batch_fast" and chars == len(asked) - chunk_bounds(long_text)[-2]
        spy.calls.clear()
    edited = long_text[: len(long_text) // 2] + "An edit in the middle.\n" + long_text[len(long_text) // 2 :]
    assert encoder.encode(edited) == backend.encode(edited).ids  # the chunks after the edit shift: encoded anew


def test_cutting_at_every_safe_position_gives_the_same_ids(backend):
    text = adversarial_text(5, 60_000, specials_of(backend))
    positions = safe_positions(text)
    assert len(positions) > 1000
    bounds = [0, *positions, len(text)]
    pieces = backend.encode_batch_fast([text[a:b] for a, b in pairwise(bounds)], add_special_tokens=False)
    assert [token for piece in pieces for token in piece.ids] == backend.encode(text, add_special_tokens=False).ids


TRICKY = ["a", "B", "é", "e\u0301", "\u0301", "東", "ア", "1", "123", "½", " ", "  ", "\t", "\n", "\n", "\n", "\r",
          "\r\n", "!", "?!", "'s", "'", "\u1100", "\u1161", "\u11a8", "\u00a0", "\u2028", "\x85", "😀", "<|eot_id|>",
          "<|im_end|>", "<｜User｜>"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(fragments=st.lists(st.sampled_from(TRICKY), max_size=40))
def test_any_short_text_cut_at_all_its_safe_positions_gives_the_same_ids(backend, fragments):
    text = "".join(fragments)
    bounds = [0, *safe_positions(text), len(text)]
    pieces = backend.encode_batch_fast([text[a:b] for a, b in pairwise(bounds)], add_special_tokens=False)
    assert [token for piece in pieces for token in piece.ids] == backend.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(before=st.text(), after=st.text())
def test_nfc_never_joins_across_a_newline(before, after):
    def nfc(text: str) -> str:
        return unicodedata.normalize("NFC", text)

    assert nfc(before + "\n" + after) == nfc(before + "\n") + nfc(after)


def test_safe_positions_are_a_newline_then_a_letter():
    assert safe_positions("a\nb\n1\n½\n é\n\nÉ\r\n東\n") == [2, 12, 15]
    assert first_safe_position("x\nA", 2) == 2 and first_safe_position("x\nA", 3) is None


def test_each_cut_is_the_first_safe_position_a_chunk_after_the_one_before():
    text = ("word " * 30 + "\n") * 2000
    bounds = chunk_bounds(text, 1000)
    assert len(bounds) > 100 and bounds[0] == 0 and bounds[-1] == len(text)
    for before, cut in pairwise(bounds[:-1]):
        assert cut == first_safe_position(text, before + 1000) and 1000 <= cut - before <= 1000 + 151
    assert first_safe_position(text, bounds[-2] + 1000) is None


def test_texts_sharing_a_prefix_share_the_chunks_that_end_inside_it():
    document = ("A line of a long contract, clause after clause.\n" * 2000)
    first, second = chunk_bounds(document + "Question one?"), chunk_bounds(document + "Another question, longer?\nYes")
    shared = [cut for cut in first if cut < len(document)]
    assert len(shared) > 3 and second[: len(shared)] == shared


def test_a_text_without_safe_positions_is_one_chunk():
    text = "one line, no newline before a letter; " * 10_000 + "\n1\n \n"
    assert chunk_bounds(text) == [0, len(text)]
    spy = SpyBackend(llama3())
    assert ChunkedEncoder(spy).encode(text) == spy._backend.encode(text).ids
    assert spy.calls_for(text) == [("encode_batch_fast", 1)]


def test_a_short_text_is_one_plain_call_without_deciding_eligibility():
    spy = SpyBackend(llama3())
    encoder = ChunkedEncoder(spy)
    assert encoder.encode("Hello\nworld\n" * 100) == spy._backend.encode("Hello\nworld\n" * 100).ids
    assert spy.calls == [("encode", 1, 1200)]
    assert "ineligible_reason" not in vars(encoder)  # decided on the first long text only


def test_gpt2_regex_is_left_out_because_a_cut_after_spaces_changes_its_pieces():
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def pieces(text: str) -> list[str]:
        return [piece for piece, _ in gpt2.pre_tokenize_str(text)]

    assert pieces("a  \nb") == ["a", "ĠĠ", "Ċ", "b"]
    assert pieces("a  \n") + pieces("b") == ["a", "ĠĠĊ", "b"]


def _with(setter):
    def variant() -> Tokenizer:
        tokenizer = llama3()
        setter(tokenizer)
        return tokenizer

    return variant


def _metaspace() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator([adversarial_text(3, 50_000, ["<s>"])], trainer)
    return tokenizer


INELIGIBLE = {
    "gpt2 regex": (_with(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=False))),
                   "ByteLevel without prefix space or regex"),
    "unknown split": (_with(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN.replace(r"[^\r\n", "[^")), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))), "Split stages are none of"),
    "lstrip token": (_with(lambda t: t.add_tokens([AddedToken("<mask>", lstrip=True)])), "strips whitespace"),
    "newline token": (_with(lambda t: t.add_special_tokens(["<|eom|>\n"])), "holds a newline"),
    "lowercase": (_with(lambda t: setattr(t, "normalizer", normalizers.Lowercase())), "neither none nor NFC"),
    "metaspace": (_metaspace, "pre-tokenizer"),
    "bpe dropout": (lambda: Tokenizer.from_str(trained_tokenizer_json(4096).replace('"dropout":null', '"dropout":0.5')),
                    "dropout"),
}  # fmt: skip


@pytest.fixture(scope="module")
def fallback_text() -> str:
    return adversarial_text(13, 40_000, specials_of(llama3()))


@pytest.mark.parametrize("name", sorted(INELIGIBLE))
def test_ineligible_tokenizers_fall_back_to_one_exact_call(name, fallback_text):
    make, reason = INELIGIBLE[name]
    tokenizer, text = make(), fallback_text
    assert reason in ineligibility_reason(tokenizer)
    if name == "bpe dropout":
        return  # its ids are random: no two calls agree
    spy = SpyBackend(tokenizer)
    assert ChunkedEncoder(spy, min_text_chars=len(text)).encode(text) == tokenizer.encode(text).ids
    assert spy.calls_for(text) == [("encode_batch_fast", 1)]  # one text: no cuts


def test_a_suffix_template_chunks_only_without_special_tokens():
    tokenizer = llama3()
    eot = tokenizer.token_to_id("<|eot_id|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <|eot_id|>",
                                                             special_tokens=[("<|eot_id|>", eot)])
    assert ineligibility_reason(tokenizer) is None and fixed_special_prefix(tokenizer) is None
    text = "Some line of text\n" * 8_000  # 144K characters: 9 chunks of CHUNK_CHARS and more
    for add_special_tokens, num_texts in ((True, 1), (False, 9)):
        spy = SpyBackend(tokenizer)
        ids = ChunkedEncoder(spy, min_text_chars=len(text)).encode(text, add_special_tokens)
        assert ids == tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert spy.calls_for(text) == [("encode_batch_fast", num_texts)]


def test_the_folder_tokenizer_encodes_long_texts_in_chunks(backend, long_text):
    tokenizer = FolderTokenizer(backend)
    assert tokenizer.encode(long_text) == backend.encode(long_text).ids
    assert tokenizer._encoder.ineligible_reason is None
