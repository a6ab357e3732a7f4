"""`TextStream` and `StopStringMatcher`: one request's output ids to text, cut at the first stop string.

The tokenizer is the small byte-level BPE the tokenizer tests train, so the token boundaries the
tests rely on are checked, not assumed: a retrained tokenizer fails loudly here rather than
testing nothing.
"""

from __future__ import annotations

import pytest

from quadapt.runtime.text.text_stream import StopStringMatcher, TextStream
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_tokenizer import build_chatml_dir

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_chatml_dir(tmp_path_factory.mktemp("chatml")))


def feed_until_stop(stream: TextStream, ids: list[int]) -> tuple[list[str], str | None]:
    """The deltas `feed` returned, up to and including the one that reported a stop string."""
    released = []
    for token in ids:
        text, stop = stream.feed(token)
        released.append(text)
        if stop is not None:
            return released, stop
    return released, None


def test_stop_string_spanning_two_tokens_is_cut_and_reported(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces[3:5] == [" fox", " jumps"], "the stop below must span these two tokens"
    stream = TextStream(tokenizer, ["NEVER-THERE", "x ju"])
    released, stop = feed_until_stop(stream, ids)
    assert (stop, stream.stop) == ("x ju", "x ju")
    assert len(released) == 5, "the stop is reported by the token that completes it"
    # Everything before the stop was released before it was complete; only "x" was held back.
    assert "".join(released[:4]) == "The quick brown fo" and released[4] == ""
    with pytest.raises(RuntimeError, match="ended"):
        stream.feed(ids[5])


def test_stop_string_across_a_split_character(tokenizer):
    text = "a crab 🦀 here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len([t for t in ids if tokenizer.decode([t]).endswith("\ufffd")]) >= 2, "🦀 must span tokens"
    stream = TextStream(tokenizer, ["🦀 h"])
    released, stop = feed_until_stop(stream, ids)
    assert stop == "🦀 h" and "".join(released) == "a crab "
    assert not any("\ufffd" in r for r in released), "no delta splits a character"


def test_finish_flushes_held_back_text_when_no_stop_completes(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tokenizer, ["g.\x00"])  # the text ends with this stop's first two characters
    released, stop = feed_until_stop(stream, ids)
    assert stop is None and "".join(released) == TEXT[:-2]
    assert stream.finish() == ("g.", None) and stream.stop is None
    with pytest.raises(RuntimeError, match="ended"):
        stream.finish()


def test_without_stops_the_text_is_the_decode(tokenizer):
    ids = tokenizer.encode("Emoji 😀 👍🏽 and <|im_end|> more", add_special_tokens=False)
    stream = TextStream(tokenizer, [])
    released, stop = feed_until_stop(stream, ids)
    tail, end = stream.finish()
    assert (stop, end) == (None, None)
    assert "".join(released) + tail == tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello w", "orl", "d! more"], ["world"], (["Hello ", "", ""], "world")),
        (["wo", "x", "yz"], ["world"], (["", "wox", "yz"], None)),
        (["abc", "def"], ["cd", "bcd"], (["a", ""], "bcd")),
        (["xx", "STOP"], ["ST", "STOP"], (["xx", ""], "STOP")),
    ],
    ids=["spanning", "false-start", "earliest-wins", "longest-at-same-place"],
)
def test_stop_string_matcher(pieces, stops, expected):
    matcher = StopStringMatcher(stops)
    released, found = [], None
    for piece in pieces:
        text, found = matcher.feed(piece)
        released.append(text)
        if found:
            break
    assert (released, found) == (expected[0][: len(released)], expected[1])
