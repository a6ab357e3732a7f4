"""One request's output as text: incremental detokenization cut at the first stop string.

`TextStream` takes a request's output token ids one at a time and returns text deltas whose
concatenation is `tokenizer.decode(ids)` cut just before the first stop string, with the stop
string that ended it. `StopStringMatcher` is its text-only half and `IncrementalDetokenizer` its
token half (text deltas that never split a character). The reference generator, the batching
engine, the server and the edge runtime each keep one `TextStream` per request.

This is the text edge of generation, and it is all it is: it does not sample, count tokens,
stop on token ids, or decide a finish reason; a caller that gets a stop string back stops the
request and reports it in its own terms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What a stream needs of a tokenizer (`tokenizer.Tokenizer` is one): the text of ids."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...


class TextStream:
    """Text deltas for one request's output ids, cut just before the first stop string.

    Text that could be the start of a stop string is held back until later tokens settle it, so
    nothing past a stop is ever returned, and no delta splits a character (see
    `IncrementalDetokenizer`). A stop string may span tokens. The stream ends at a stop string or
    at `finish()`; after either, `feed` and `finish` raise.

    Attributes:
        stop: the stop string that ended the stream, else None.
    """

    def __init__(self, tokenizer: Decoder, stop: list[str], skip_special_tokens: bool = True) -> None:
        """Start an empty stream.

        Args:
            tokenizer: the model's tokenizer.
            stop: strings that end the output; the text returned stops just before the first
                to appear (the longest, if several begin at one place). Empty strings are ignored.
            skip_special_tokens: leave special tokens (eos, `<|im_end|>`, ...) out of the text.
        """
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._matcher = StopStringMatcher(stop)
        self._ended = False
        self.stop: str | None = None

    def feed(self, token_id: int) -> tuple[str, str | None]:
        """Add the next output token.

        Args:
            token_id: the token id sampled after the previous one.

        Returns:
            (text, stop): the text now safe to show ("" while it is held back), and the stop
            string if this token completed one, in which case `text` ends just before it and
            the stream is over.

        Raises:
            RuntimeError: the stream already ended, at a stop string or by `finish`.
        """
        self._check_open()
        text, self.stop = self._matcher.feed(self._detokenizer.add(token_id))
        self._ended = self.stop is not None
        return text, self.stop

    def finish(self) -> tuple[str, str | None]:
        """End the stream once the output has no more tokens.

        Returns:
            (text, stop): the text still held back (an incomplete character decodes to U+FFFD),
            and the stop string if that last text completed one, in which case `text` ends just
            before it.

        Raises:
            RuntimeError: the stream already ended, at a stop string or by `finish`.
        """
        self._check_open()
        text, self.stop = self._matcher.feed(self._detokenizer.finish())
        if self.stop is None:
            text += self._matcher.flush()
        self._ended = True
        return text, self.stop

    def _check_open(self) -> None:
        # Text fed after the end would restart stop matching on an empty buffer and leak output.
        if self._ended:
            raise RuntimeError("this TextStream has ended (at a stop string or by finish()); use a new one per request")


class StopStringMatcher:
    """Cuts a text stream just before the first stop string, holding back what might start one.

    Invariant: no stop string begins inside text already released, because every suffix of the
    stream that is a prefix of some stop string stays pending until it is settled.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add `delta`; return the text now safe to release, and the stop string if one was found
        (the text released then ends just before it, and the stream is over)."""
        self._pending += delta
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            index, stop = min(found, key=lambda f: (f[0], -len(f[1])))
            text, self._pending = self._pending[:index], ""
            return text, stop
        hold = self._longest_partial_stop()
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return text, None

    def flush(self) -> str:
        """The held-back text, once the stream ends without completing a stop string."""
        text, self._pending = self._pending, ""
        return text

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text deltas whose concatenation is `decode(all ids)`.

    Each step decodes a short window (the tokens of the last emitted delta, then the new ones)
    and emits the difference between the window's text with and without the new tokens, as
    vLLM and TGI do: this keeps word-initial spaces right for tokenizers whose decoders strip
    the first one. While the text ends in U+FFFD (a UTF-8 character whose bytes are split
    across tokens) nothing is emitted; `finish()` flushes whatever is still held.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        # Invariant: ids[:read] are emitted; ids[prefix:read] are the last delta's tokens, the window's context.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        context = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip_special_tokens)
        text = decode(self._ids[self._prefix :], skip_special_tokens=self._skip_special_tokens)
        if len(text) <= len(context) or (text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]
