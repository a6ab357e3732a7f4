"""One sequence's decode loop and how it ended, without torch: shared by the reference generator
(`generate.py`, torch) and the edge runtime (`edge/generate.py`, onnxruntime and numpy).

`decode_loop` feeds the prompt, then one picked token per step, until eos, a stop token,
`max_new_tokens` or the model's context, counting as OpenAI-style usage counts; what runs the
model and what picks a token are the caller's (`forward`, `pick`). `text_loop` runs those ids
through a `TextStream` and ends at a stop string. Both fill a `GenerationResult`, read through
the `Generation` iterator they are wrapped in. `check_prompt_ids` refuses a prompt that cannot run.

This file runs no model and samples nothing: it holds the order of the stop checks and their
counting, once, so that both runtimes stop on the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from ..errors import ContextLengthError, InvalidParameterError, UnsupportedError
from .sampling_params import SamplingParams
from .text_stream import Decoder, TextStream

FinishReason = Literal["stop", "length"]
T = TypeVar("T")
L = TypeVar("L")  # a runtime's logits row: a torch tensor or a numpy array


@dataclass
class GenerationResult:
    """How a generation went; filled in while it runs.

    Attributes:
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens sampled, counting a final eos or stop token (which is never
            output), as OpenAI-style usage counts them.
        finish_reason: "stop" (eos, a stop token or a stop string) or "length"
            (`max_new_tokens` or the model's context); None until the output is exhausted, and
            stays None if the caller stops early.
        stop_reason: the eos/stop token id or the stop string that ended it, else None.
        context_full: True when it finished with "length" because the prompt and output filled
            the model's context before `max_new_tokens` was reached, so the output is shorter
            than asked; False otherwise (including when both limits fall on the same token).
    """

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    context_full: bool = False


class Generation(Iterator[T], Generic[T]):
    """A running generation: iterate it for the output, read `result` for how it ended.

    Iterating runs the model; `close()` (or dropping it) ends generation early and frees the cache.
    """

    def __init__(self, outputs: Generator[T, None, None], result: GenerationResult) -> None:
        self._outputs = outputs
        self.result = result

    def __iter__(self) -> Generation[T]:
        return self

    def __next__(self) -> T:
        return next(self._outputs)

    def close(self) -> None:
        """Stop generating; `result` keeps what was counted so far."""
        self._outputs.close()


def check_prompt_ids(prompt_ids: Iterable[int], vocab_size: int, context: int) -> list[int]:
    """The prompt as a list of ints, after checking that it can run and leaves room for output.

    Raises:
        InvalidParameterError: an empty prompt, or an id outside [0, vocab_size).
        ContextLengthError: the prompt leaves no room in the context for even one new token.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidParameterError(
            "prompt_ids is empty; the model needs at least one token to condition on (e.g. the BOS token)"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidParameterError(
            f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}); "
            "encode the prompt with this model's tokenizer"
        )
    if len(prompt) >= context:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the model's context is {context}, which leaves no room "
            f"for output; shorten the prompt to at most {context - 1} tokens"
        )
    return prompt


def refuse_logprobs(params: SamplingParams, runner: str) -> None:
    """Refuse `params.logprobs` in a loop that cannot report them (only the engine computes them).

    Raises:
        UnsupportedError: `params.logprobs` is set.
    """
    if params.logprobs is not None:
        raise UnsupportedError(
            f"{runner} does not report logprobs; leave SamplingParams.logprobs unset, or generate through "
            "the engine (quadapt.LLM, quadapt.AsyncLLM or the server), which returns them"
        )


def decode_loop(
    forward: Callable[[list[int]], L],
    pick: Callable[[L, list[int]], int],
    prompt: list[int],
    params: SamplingParams,
    eos_token_ids: set[int],
    result: GenerationResult,
    context: int,
) -> Generator[int, None, None]:
    """Yield each new token id after `prompt` (checked by `check_prompt_ids`); eos and stop
    tokens are not yielded. The last token is never fed back, so the model needs room for
    `min(len(prompt) + params.max_new_tokens - 1, context)` positions.

    Args:
        forward: runs ids (the prompt first, then one token a step) after those fed before and
            returns the logits of the last position.
        pick: the next token from those logits and every id so far (prompt and output, for the
            repetition penalty).
        prompt: the prompt's ids.
        params: the stop conditions (`max_new_tokens`, `stop_token_ids`, `ignore_eos`).
        eos_token_ids: the model's end-of-sequence ids; they stop unless `params.ignore_eos`.
        result: filled in as it runs.
        context: the model's context; prompt and output together stop at it.
    """
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    seen = list(prompt)  # what the repetition penalty looks at: prompt and output
    fed = prompt
    while True:
        token = pick(forward(fed), seen)
        result.completion_tokens += 1
        if token in stop_ids:
            result.finish_reason, result.stop_reason = "stop", token
            return
        yield token
        seen.append(token)
        if result.completion_tokens >= params.max_new_tokens:
            result.finish_reason = "length"
            return
        if len(seen) >= context:
            result.finish_reason, result.context_full = "length", True
            return
        fed = [token]


def text_loop(ids: Generation[int], tokenizer: Decoder, stop: list[str]) -> Generation[str]:
    """The output of `ids` as non-empty text deltas, `tokenizer.decode(ids)` (special tokens
    skipped) cut just before the first of `stop`; a stop string that ends it shows in the result
    as finish_reason "stop" with that string as stop_reason. Closing it closes `ids`."""
    return Generation(_text_deltas(ids, TextStream(tokenizer, stop)), ids.result)


def _text_deltas(ids: Generation[int], stream: TextStream) -> Generator[str, None, None]:
    try:
        for token in ids:
            text, stop = stream.feed(token)
            if text:
                yield text
            if stop is not None:
                _stopped_at(ids.result, stop)
                return
        text, stop = stream.finish()
        if text:
            yield text
        if stop is not None:
            _stopped_at(ids.result, stop)
    finally:
        ids.close()


def _stopped_at(result: GenerationResult, stop: str) -> None:
    # A stop string completed by the last token cuts the output, so even if the id loop had
    # already ended on a length limit, the text ended at the stop string and nothing was lost.
    result.finish_reason, result.stop_reason, result.context_full = "stop", stop, False
