"""Requests and outputs of `LLM` and `AsyncLLM`, and the text made from the engine's token ids.

`GenerateRequest` is one request (a prompt, its sampling settings and adapter); `TextDelta` is
what one engine step gave a request, and `Completion` a finished request. `OutputProcessor` turns
the engine's token ids into text deltas, one `TextStream` per request, and ends a request at its
first stop string (the engine sees ids only, so stop strings are settled here and the request is
aborted in the engine). `requests_of` turns the public API's keywords (prompts, one adapter or a
list, sampling keywords or `params=`) into `GenerateRequest`s, checking them all first.

Nothing in this file samples, schedules, or owns a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import Engine, RequestOutput
from ..errors import InvalidParameterError, RequestFailedError
from ..text.prompt import Prompt, text_or_messages
from ..text.sampling_params import SamplingParams
from ..text.text_stream import TextStream
from ..text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The sampling keywords `generate` and `stream` take (SamplingParams' fields, stop_token_ids the
# library's only).
SETTINGS = frozenset(
    {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "ignore_eos"}
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


class OutputProcessor:
    """Per-request text streams over an engine's outputs; ends requests at their stop strings."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._streams: dict[str, TextStream] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)

    def discard(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def process(self, outputs: Sequence[RequestOutput]) -> list[TextDelta]:
        """Text deltas for one step's outputs; a request whose text completes a stop string is
        aborted in the engine and reported finished with that string as its stop reason."""
        deltas = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            try:
                deltas.append(self._delta(out, stream))
            except Exception as e:  # noqa: BLE001 - one request's text failing ends that request alone
                logger.error("request %s: its text could not be made: %r", out.request_id, e, exc_info=e)
                if not out.finished:
                    self.engine.abort(out.request_id)
                self._streams.pop(out.request_id, None)
                error = RequestFailedError(f"request {out.request_id} failed while its text was made "
                                           f"({type(e).__name__}); the server log has the details")
                deltas.append(TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens,
                                        out.completion_tokens, error=error))
        return deltas

    def _delta(self, out: RequestOutput, stream: TextStream) -> TextDelta:
        """The text delta of one engine output; ends the request at a stop string."""
        if out.error is not None:
            del self._streams[out.request_id]
            return TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens, out.completion_tokens,
                             error=out.error)
        text, stop = "", None
        for token in out.new_token_ids:
            piece, stop = stream.feed(token)
            text += piece
            if stop is not None:
                break
        if stop is None and out.finished:
            piece, stop = stream.finish()
            text += piece
        finished, reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        if stop is not None:
            if not out.finished:
                self.engine.abort(out.request_id)
            finished, reason, stop_reason = True, "stop", stop
        if finished:
            del self._streams[out.request_id]
        return TextDelta(
            out.request_id, text, list(out.new_token_ids), finished, reason, stop_reason,
            out.prompt_tokens, out.completion_tokens, out.context_full and stop is None,
        )


def completion_of(rid: str, deltas: list[TextDelta]) -> Completion:
    """The `Completion` of a finished request from its text deltas, in order."""
    last = deltas[-1]
    return Completion(
        rid, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], last.finish_reason,
        last.stop_reason, last.prompt_tokens, last.completion_tokens, last.context_full,
        str(last.error) if last.error is not None else None,
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
