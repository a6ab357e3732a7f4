"""Generation at the edge: the reference generator's loop and stop conditions over an `EdgeModel`.

`generate_ids` prefills the prompt, then feeds back one sampled token per step until eos, a stop
token, `max_new_tokens` or the context, exactly as `runtime.generate.generate_ids` does (the same
order of checks, the same counting); `generate_text` streams the output as text cut at stop
strings. Both return a `Generation` whose `result` says how it ended. Greedy steps touch no
random generator and copy nothing but the token id; sampling works on the logits view in numpy.

This is the edge's generator and only that: no batching, no server, no torch.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np

from ..errors import ContextLengthError
from .model import EdgeModel
from .sampling import SamplingParams, sample
from .text import EdgeTokenizer, OutputText

T = TypeVar("T")


@dataclass
class GenerationResult:
    """How a generation went (the fields of `runtime.generate.GenerationResult`)."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None
    context_full: bool = False


class Generation(Iterator[T], Generic[T]):
    """A running generation: iterate it for the output, read `result` for how it ended."""

    def __init__(self, outputs: Generator[T, None, None], result: GenerationResult) -> None:
        self._outputs, self.result = outputs, result

    def __iter__(self) -> Generation[T]:
        return self

    def __next__(self) -> T:
        return next(self._outputs)

    def close(self) -> None:
        """Stop generating early."""
        self._outputs.close()


def generate_ids(
    model: EdgeModel,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_ids: set[int],
    adapter: str | None = None,
) -> Generation[int]:
    """Generate token ids after `prompt_ids`, one at a time.

    Args:
        model: the exported model.
        prompt_ids: the prompt's ids, at least one.
        params: sampling settings and stop conditions.
        eos_token_ids: ids that stop generation unless `params.ignore_eos`.
        adapter: one of the export's adapters, or None for the base model.

    Returns:
        A `Generation` yielding each new id; eos and stop tokens are not yielded.

    Raises:
        InvalidParameterError: an empty prompt, an id outside the vocabulary, an unknown adapter.
        ContextLengthError: the prompt leaves no room for one new token.
    """
    context = model.manifest.context_length
    prompt = [int(t) for t in prompt_ids]
    if len(prompt) >= context:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the model's context is {context}, which leaves no room "
            f"for output; shorten the prompt to at most {context - 1} tokens"
        )
    # The last sampled token is never fed back, so prompt + max_new_tokens - 1 positions suffice.
    sequence = model.start(prompt, min(len(prompt) + params.max_new_tokens - 1, context), adapter)
    result = GenerationResult(prompt_tokens=len(prompt))
    return Generation(_decode_loop(sequence, prompt, params, set(eos_token_ids), result, context), result)


def _decode_loop(sequence, prompt: list[int], params: SamplingParams, eos: set[int], result: GenerationResult, context: int):
    rng = np.random.default_rng(params.seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
    plain_greedy = params.greedy and params.repetition_penalty == 1.0
    seen = list(prompt)
    logits = sequence.logits
    while True:
        token = int(np.argmax(logits)) if plain_greedy else sample(logits, params, rng, seen)
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
        logits = sequence.step(token)


def generate_text(
    model: EdgeModel,
    tokenizer: EdgeTokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter: str | None = None,
) -> Generation[str]:
    """Generate after `prompt_ids` and stream the output as text deltas, cut before the first of
    `params.stop` (a stop string that ends it shows as finish_reason "stop" with that string).

    Raises:
        InvalidParameterError, ContextLengthError: as `generate_ids`.
    """
    ids = generate_ids(model, prompt_ids, params, tokenizer.eos_token_ids, adapter)
    return Generation(_text_loop(ids, OutputText(tokenizer, params.stop)), ids.result)


def _text_loop(ids: Generation[int], text: OutputText) -> Generator[str, None, None]:
    try:
        for token in ids:
            delta = text.feed(token)
            if delta:
                yield delta
            if text.stop is not None:
                ids.result.finish_reason, ids.result.stop_reason, ids.result.context_full = "stop", text.stop, False
                return
        delta = text.finish()
        if delta:
            yield delta
        if text.stop is not None:
            ids.result.finish_reason, ids.result.stop_reason, ids.result.context_full = "stop", text.stop, False
    finally:
        ids.close()
