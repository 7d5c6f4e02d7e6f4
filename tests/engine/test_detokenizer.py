"""IncrementalDetokenizer: deltas add up to `decode`, never show half a character, decode a small window."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from model_folder.tokenizer import Tokenizer
from model_folder.tokenizer_training import SPECIAL_TOKENS
from model_shards.make_model import make_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_folder(make_model(tmp_path_factory.mktemp("model")))


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detokenizer.append(token_id) for token_id in output_ids]
    return deltas, detokenizer.flush()


token_ids = st.lists(st.integers(0, 1023), max_size=40)


@settings(max_examples=300, deadline=None)
@given(prompt_ids=token_ids, output_ids=token_ids, skip=st.booleans())
def test_deltas_and_flush_add_up_to_decode_for_random_ids(tokenizer, prompt_ids, output_ids, skip):
    deltas, rest = stream(tokenizer, prompt_ids, output_ids, skip)
    assert "".join(deltas) + rest == tokenizer.decode(output_ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(prompt=st.text(max_size=20), output=st.text(max_size=40))
def test_text_streams_back_exactly_without_replacement_characters(tokenizer, prompt, output):
    # Text spelling a special token ("<|end_header_id|>") encodes to that token, which decoding skips.
    assume(not any(special in output for special in SPECIAL_TOKENS))
    output_ids = tokenizer.encode(output, add_special_tokens=False)
    deltas, rest = stream(tokenizer, tokenizer.encode(prompt), output_ids)
    assert "".join(deltas) == output and rest == ""
    assert not any("\ufffd" in delta for delta in deltas)


def test_a_character_split_over_tokens_appears_whole_once_complete(tokenizer):
    output_ids = tokenizer.encode("東京😀!", add_special_tokens=False)
    # Byte-level tokens: "æ", "Ŀ" (two bytes of 東), "±äº¬" (its last byte and all of 京), ...
    assert len(output_ids) > 4
    deltas, _ = stream(tokenizer, tokenizer.encode("Where? "), output_ids)
    assert [delta for delta in deltas if delta] == ["東京", "😀", "!"]
    assert deltas[:2] == ["", ""]  # held until the bytes of 東 are complete


def test_prompt_ending_inside_a_character_does_not_lend_its_bytes(tokenizer):
    bytes_of_east = tokenizer.encode("東", add_special_tokens=False)
    prompt, output = tokenizer.encode("x") + bytes_of_east[:-1], bytes_of_east[-1:] + tokenizer.encode("y", False)
    deltas, rest = stream(tokenizer, prompt, output)
    assert "".join(deltas) + rest == tokenizer.decode(output) == "\ufffdy"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    output_ids = tokenizer.encode("a<|eot_id|>b", add_special_tokens=False)
    assert "".join(stream(tokenizer, [], output_ids, skip_special_tokens=True)[0]) == "ab"
    assert "".join(stream(tokenizer, [], output_ids, skip_special_tokens=False)[0]) == "a<|eot_id|>b"


def test_flush_renders_an_unfinished_character_like_decode(tokenizer):
    output_ids = tokenizer.encode("ok 東", add_special_tokens=False)[:-1]
    deltas, rest = stream(tokenizer, [], output_ids)
    assert "".join(deltas) == "ok " and rest == tokenizer.decode(output_ids)[3:] == "\ufffd"


class CountingTokenizer:
    """Records the longest id list each decode call receives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens)


def test_each_step_decodes_a_small_window_however_long_the_output(tokenizer):
    counting = CountingTokenizer(tokenizer)
    output_ids = tokenizer.encode("naïve 東京 café 😀 " * 300, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(counting, tokenizer.encode("prompt " * 100))
    text = "".join(detokenizer.append(token_id) for token_id in output_ids)
    assert text == "naïve 東京 café 😀 " * 300 and len(output_ids) > 3000
    assert counting.longest <= 8
