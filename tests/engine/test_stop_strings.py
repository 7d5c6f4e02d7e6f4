"""StopStringMatcher: OpenAI stop semantics over streamed deltas, never leaking part of a stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.stop_strings import StopStringMatcher
from model_folder.tokenizer import Tokenizer
from model_shards.make_model import make_model


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the stop string that completes first when the text is read one character at a time."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)], True
    return text, False


def run(stops, deltas):
    """Everything a client would see, checking after each delta that nothing is ever taken back."""
    matcher = StopStringMatcher(stops)
    expected, _ = reference("".join(deltas), stops)
    seen = ""
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        seen += text
        assert expected.startswith(seen)  # no part of a stop string (nor anything after one) leaks
        if stopped:
            return seen, True
    return seen + matcher.flush(), False


def split(text, cuts):
    cuts = sorted({cut % (len(text) + 1) for cut in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet="ab東京 ", max_size=30),
    stops=st.lists(st.text(alphabet="ab東京 ", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_streamed_result_equals_the_reference_however_the_text_is_split(text, stops, cuts):
    assert run(stops, split(text, cuts)) == reference(text, stops)


def test_stop_string_spanning_deltas_is_held_then_dropped():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("42 </an") == ("42 ", False)
    assert matcher.feed("swer> more") == ("", True)
    assert matcher.flush() == ""


def test_a_held_prefix_that_does_not_complete_is_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.flush() == "ST"


def test_stop_at_the_very_start_returns_nothing():
    assert StopStringMatcher(["Hello"]).feed("Hello world") == ("", True)
    assert run(["Hello"], list("Hello world")) == ("", True)


@pytest.mark.parametrize("stops", [["ab", "abc"], ["abc", "ab"]])
def test_overlapping_candidates_stop_at_the_first_to_complete(stops):
    assert run(stops, ["x", "a", "b", "c", "y"]) == ("x", True)
    assert run(stops, ["xabcy"]) == ("x", True)


def test_shorter_stop_completing_inside_a_longer_candidate_wins():
    # "c" completes at the 3rd character, before "abcd" could: the same cut for any split.
    assert run(["abcd", "c"], list("abcd")) == ("ab", True)
    assert run(["abcd", "c"], ["abcd"]) == ("ab", True)


def test_many_one_character_deltas():
    text = "lorem ipsum " * 50 + "<|end|>" + "tail"
    assert run(["<|end|>", "</s>"], list(text)) == ("lorem ipsum " * 50, True)


def test_no_stop_strings_pass_everything_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False) and matcher.flush() == ""


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", True)
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""


def test_stop_inside_a_character_split_over_tokens(tmp_path):
    """東京 spans byte-level tokens with 京's first bytes inside 東's last token; stop "京" still cuts cleanly."""
    tokenizer = Tokenizer.from_folder(make_model(tmp_path))
    output_ids = tokenizer.encode("東京は大きい", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Where?"))
    matcher = StopStringMatcher(["京"])
    seen = ""
    for token_id in output_ids:
        text, stopped = matcher.feed(detokenizer.append(token_id))
        seen += text
        if stopped:
            break
    assert (seen, stopped) == ("東", True)
