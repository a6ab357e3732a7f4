"""Requests and outputs of `LLM` and `AsyncLLM`, and the text made from the engine's token ids.

`GenerateRequest` is one request (a prompt, its sampling settings and adapter); `TextDelta` is
what one engine step gave a request, and `Completion` a finished request. `OutputProcessor` turns
the engine's token ids into text deltas, one `TextStream` per request, and ends a request at its
first stop string (the engine sees ids only, so stop strings are settled here and the request is
aborted in the engine). For a request that asked for logprobs, it also names their tokens and
keeps them with the text they belong to (`LogprobAligner`). `requests_of` turns the public API's keywords (prompts, one adapter or a
list, sampling keywords or `params=`) into `GenerateRequest`s, checking them all first.

Nothing in this file samples, schedules, or owns a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import Engine, RequestOutput
from ..engine.sampling import TokenLogprobs
from ..errors import InvalidParameterError, RequestFailedError
from ..text.prompt import Prompt, text_or_messages
from ..text.sampling_params import SamplingParams
from ..text.text_stream import IncrementalDetokenizer, TextStream
from ..text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The sampling keywords `generate` and `stream` take (SamplingParams' fields, stop_token_ids the
# library's only).
SETTINGS = frozenset(
    {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "ignore_eos",
     "logprobs"}
)


@dataclass(frozen=True)
class GenerateRequest:
    """One request for `LLM.generate`.

    Attributes:
        prompt: raw text (the tokenizer's special tokens added), or chat messages
            (`[{"role": ..., "content": ...}]`, rendered by the chat template).
        params: sampling settings and stop conditions.
        adapter: the name of a loaded adapter, or None for the base model.
        request_id: a unique id; None makes one.
    """

    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model's raw distribution (see `SamplingParams.logprobs`).

    Attributes:
        token_id: the token.
        token: its text: the tokenizer's decode of this token alone, special tokens included
            (a token holding part of a UTF-8 character decodes to U+FFFD).
        logprob: its log-probability.
        top_logprobs: for an output token, the most likely tokens at its position, most likely
            first (as many as the request asked); empty for an alternative.
    """

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class TextDelta:
    """New text of one request, and how it ended once it has.

    Attributes:
        request_id: the request.
        text: text released this step ("" while held back, e.g. a possible stop string).
        token_ids: tokens produced this step.
        finished: the request is over.
        finish_reason: "stop", "length", "abort" or "error" once finished.
        stop_reason: the eos/stop token id or the stop string that ended it, else None.
        prompt_tokens, completion_tokens: usage so far.
        context_full: it ended because the model's context was full.
        error: why it failed, with finish reason "error", else None.
        logprobs: when the request asked (`SamplingParams.logprobs`), the tokens whose text this
            delta releases, with their logprobs (see `LogprobAligner`), else None.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    context_full: bool = False
    error: Exception | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """A finished request: the whole text and how it ended (fields as in `TextDelta`)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    context_full: bool = False
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None


class LogprobAligner:
    """Keeps one request's logprobs with the text they belong to, as `TextStream` releases it.

    A token's logprob goes out with the delta that releases the first character of its text, so
    a token whose text is held back (a possible stop string, an unfinished UTF-8 character) waits
    with it, and a token with no text of its own (a skipped special token) goes out with the next
    text. At a stop string, the tokens whose text lies wholly in or after it are left out, as
    their text is; at the end of the output, every token still waiting goes out.

    It reads the raw text of each token from a detokenizer of its own, the same as the stream's,
    so that it knows where each token's text begins.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._raw = 0  # characters of text the tokens so far make
        self._released = 0  # characters of it the stream has released
        self._waiting: list[tuple[int, TokenLogprob]] = []  # (where its text begins, its logprob)

    def feed(self, token_id: int, logprobs: TokenLogprobs, released: str, stop: str | None) -> list[TokenLogprob]:
        """Add an output token and what the stream released for it; return the logprobs now due."""
        self._waiting.append((self._raw, self._named(token_id, logprobs)))
        self._raw += len(self._detokenizer.add(token_id))
        return self._release(released, everything=False, stop=stop)

    def finish(self, released: str, stop: str | None) -> list[TokenLogprob]:
        """The output has ended with `released` as the stream's last text: the logprobs still due."""
        return self._release(released, everything=stop is None, stop=stop)

    def _release(self, released: str, *, everything: bool, stop: str | None) -> list[TokenLogprob]:
        self._released += len(released)
        due = [lp for begins, lp in self._waiting if everything or begins < self._released]
        self._waiting = [] if stop is not None else self._waiting[len(due):]
        return due

    def _named(self, token_id: int, logprobs: TokenLogprobs) -> TokenLogprob:
        top = [TokenLogprob(t, self._text(t), lp) for t, lp in logprobs.top]
        return TokenLogprob(token_id, self._text(token_id), logprobs.logprob, top)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


class OutputProcessor:
    """Per-request text streams over an engine's outputs; ends requests at their stop strings."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._streams: dict[str, TextStream] = {}
        self._aligners: dict[str, LogprobAligner] = {}  # the requests that asked for logprobs

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        if params.logprobs is not None:
            self._aligners[request_id] = LogprobAligner(self.tokenizer)

    def discard(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._aligners.pop(request_id, None)

    def process(self, outputs: Sequence[RequestOutput]) -> list[TextDelta]:
        """Text deltas for one step's outputs; a request whose text completes a stop string is
        aborted in the engine and reported finished with that string as its stop reason."""
        deltas = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            try:
                deltas.append(self._delta(out, stream, self._aligners.get(out.request_id)))
            except Exception as e:  # noqa: BLE001 - one request's text failing ends that request alone
                logger.error("request %s: its text could not be made: %r", out.request_id, e, exc_info=e)
                if not out.finished:
                    self.engine.abort(out.request_id)
                self.discard(out.request_id)
                error = RequestFailedError(f"request {out.request_id} failed while its text was made "
                                           f"({type(e).__name__}); the server log has the details")
                deltas.append(TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens,
                                        out.completion_tokens, error=error))
        return deltas

    def _delta(self, out: RequestOutput, stream: TextStream, aligner: LogprobAligner | None) -> TextDelta:
        """The text delta of one engine output; ends the request at a stop string."""
        if out.error is not None:
            self.discard(out.request_id)
            return TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens, out.completion_tokens,
                             error=out.error)
        text, stop = "", None
        logprobs: list[TokenLogprob] | None = None if aligner is None else []
        for i, token in enumerate(out.new_token_ids):
            piece, stop = stream.feed(token)
            text += piece
            if aligner is not None:
                assert out.logprobs is not None, "the engine computes logprobs for every request that asks"
                logprobs += aligner.feed(token, out.logprobs[i], piece, stop)
            if stop is not None:
                break
        if stop is None and out.finished:
            piece, stop = stream.finish()
            text += piece
            if aligner is not None:
                logprobs += aligner.finish(piece, stop)
        finished, reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        if stop is not None:
            if not out.finished:
                self.engine.abort(out.request_id)
            finished, reason, stop_reason = True, "stop", stop
        if finished:
            self.discard(out.request_id)
        return TextDelta(
            out.request_id, text, list(out.new_token_ids), finished, reason, stop_reason,
            out.prompt_tokens, out.completion_tokens, out.context_full and stop is None, logprobs=logprobs,
        )


def completion_of(rid: str, deltas: list[TextDelta]) -> Completion:
    """The `Completion` of a finished request from its text deltas, in order."""
    last = deltas[-1]
    logprobs = None if last.logprobs is None else [lp for d in deltas for lp in d.logprobs or ()]
    return Completion(
        rid, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], last.finish_reason,
        last.stop_reason, last.prompt_tokens, last.completion_tokens, last.context_full,
        str(last.error) if last.error is not None else None, logprobs,
    )


def sampling_params(params: Any, settings: dict[str, Any]) -> SamplingParams:
    """`params` if given, else SamplingParams from the sampling keywords and their defaults (greedy).

    Raises:
        InvalidParameterError: both `params` and keywords, an unknown keyword, or a setting
            outside its range.
    """
    if params is not None:
        if settings:
            raise InvalidParameterError(
                f"pass sampling settings as params= or as keywords, not both (got {sorted(settings)})"
            )
        return params
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise InvalidParameterError(
            f"unknown sampling setting(s) {unknown}; the settings are {', '.join(sorted(SETTINGS))}"
        )
    if settings.get("stop") is None:
        settings = {k: v for k, v in settings.items() if k != "stop"}
    return SamplingParams(**settings)


def requests_of(
    prompts: Any, params: Any, adapter: Any, chat: bool | None, settings: dict[str, Any]
) -> list[GenerateRequest]:
    """The requests `LLM.generate` and `AsyncLLM.generate` run, every one checked first.

    Args:
        prompts: a list of prompts (raw text or chat messages; a lone string or conversation is a
            list of one), or a list of `GenerateRequest`s (then nothing else may be given).
        params: one `SamplingParams` for every prompt, a list of one per prompt, or None.
        adapter: one adapter name (or None) for every prompt, or a list of one per prompt.
        chat: None follows each prompt's type; True wraps every string as one user message.
        settings: sampling keywords for every prompt (instead of `params`).

    Raises:
        InvalidParameterError: a malformed prompt, lists not aligned with the prompts, an
            unknown keyword or a setting outside its range, or `params` with keywords.
    """
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, GenerateRequest) for p in prompts):
        if params is not None or adapter is not None or chat is not None or settings:
            raise InvalidParameterError(
                "GenerateRequests carry their own params and adapter; pass them alone, or pass prompts with settings"
            )
        return list(prompts)
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(m, Mapping) for m in prompts)
    ):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidParameterError(
            f"prompts must be a list of prompts (strings or message lists), got {prompts!r:.200}"
        )
    n = len(prompts)
    names = per_prompt("adapter", adapter, n, "an adapter name or None", is_adapter_name)
    sampling = per_prompt("params", sampling_params(params, settings), n, "a SamplingParams", is_params)
    return [GenerateRequest(text_or_messages(p, chat), s, a) for p, s, a in zip(prompts, sampling, names)]


def is_params(value: object) -> bool:
    return isinstance(value, SamplingParams)


def is_adapter_name(value: object) -> bool:
    return value is None or isinstance(value, str)


def per_prompt(name: str, value: Any, n: int, what: str, is_one: Callable[[Any], bool]) -> list[Any]:
    """`value` for each of `n` prompts: one value for all, or a list of `n`."""
    if is_one(value):
        return [value] * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(is_one(v) for v in value):
        return list(value)
    raise InvalidParameterError(f"{name} must be {what}, or a list of {n} of them (one per prompt); got {value!r:.200}")
