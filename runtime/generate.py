"""The reference generator: one sequence, one token at a time, slow and obviously correct.

`generate_ids` prefills the prompt into a `KVCache`, then feeds back one sampled token per step
until eos, a stop token, `max_new_tokens` or the model's context. It sees token ids only.
`generate_text` runs those ids through a `TextStream` (text_stream.py), which does the text
work: incremental detokenization and stop strings. Both return a `Generation`, an iterator whose
`result` tells the caller, once the iterator is exhausted, why it finished and how many tokens
it used.

This is the yardstick for the batching engine, which must produce the same tokens for the same
seed; it does not batch, schedule, or share a cache between requests, and it holds no text
logic of its own.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import torch
from torch import nn

from .config import ModelConfig
from .errors import ContextLengthError, InvalidParameterError
from .kv_cache import KVCache
from .sampling import SamplingParams, sample
from .text_stream import TextStream
from .tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]
T = TypeVar("T")


class LanguageModel(Protocol):
    """What the generator needs of a model (`CausalLM` has it): logits [B, T, V] (or the last
    `logits_to_keep` positions) for ids [B, T] placed after the cache's prefix, a `config` with
    the context limit, and parameters."""

    config: ModelConfig

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, logits_to_keep: int = 0) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


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


def generate_ids(
    model: LanguageModel,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_ids: set[int],
) -> Generation[int]:
    """Generate token ids after `prompt_ids`, one at a time.

    The prompt and the output share the model's context: generation stops with "length" once
    they fill it, and `result.context_full` tells that apart from reaching `max_new_tokens`. A fixed `params.seed` reproduces the output; without one each call draws a
    fresh seed. Greedy decoding (temperature 0) never touches the generator.

    Args:
        model: a causal LM following `CausalLM`'s interface (see `LanguageModel`).
        prompt_ids: the prompt's token ids, special tokens included; at least one.
        params: sampling settings and stop conditions.
        eos_token_ids: the model's end-of-sequence ids (e.g. `Tokenizer.eos_token_ids`); they
            stop generation unless `params.ignore_eos`.

    Returns:
        A `Generation` yielding each new token id; eos and stop tokens are not yielded.

    Raises:
        InvalidParameterError: an empty prompt, a prompt id outside the model's vocabulary, or a
            model without floating-point parameters (whose dtype and device are then unknown).
        ContextLengthError: the prompt leaves no room in the context for even one new token.
    """
    config = model.config
    context = config.max_position_embeddings
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidParameterError(
            "prompt_ids is empty; the model needs at least one token to condition on (e.g. the BOS token)"
        )
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidParameterError(
            f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {config.vocab_size}); "
            "encode the prompt with this model's tokenizer"
        )
    if len(prompt) >= context:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the model's context is {context}, which leaves no room "
            f"for output; shorten the prompt to at most {context - 1} tokens"
        )
    weight = _first_float_parameter(model)
    result = GenerationResult(prompt_tokens=len(prompt))
    return Generation(_decode_loop(model, weight, prompt, params, set(eos_token_ids), result), result)


def _decode_loop(
    model: LanguageModel,
    weight: torch.Tensor,
    prompt: list[int],
    params: SamplingParams,
    eos_token_ids: set[int],
    result: GenerationResult,
) -> Generator[int, None, None]:
    config = model.config
    context = config.max_position_embeddings
    device = weight.device  # the cache takes the model's float dtype and device
    # The last sampled token is never fed back, so prompt + max_new_tokens - 1 positions suffice.
    # Every tensor op runs under inference_mode, whatever mode the caller is in between steps.
    with torch.inference_mode():
        cache = KVCache.allocate(
            config, batch_size=1, max_seq_len=min(len(prompt) + params.max_new_tokens - 1, context),
            dtype=weight.dtype, device=device,
        )
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
    seen = list(prompt)  # what the repetition penalty looks at: prompt and output
    step_ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    while True:
        # Per step, not around the loop: a mode held across `yield` would leak into the caller.
        with torch.inference_mode():
            logits = model(step_ids, cache=cache, logits_to_keep=1)[0, -1]  # [V]
            token = sample(logits, params, generator, seen)
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
        step_ids = torch.tensor([[token]], dtype=torch.long, device=device)


def _first_float_parameter(model: LanguageModel) -> torch.Tensor:
    """A floating-point parameter: its dtype and device are the model's (quantized weights are
    integer-typed, so the first parameter alone could mislead)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p
    raise InvalidParameterError("the model has no floating-point parameters, so its dtype and device are unknown")


def generate_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
) -> Generation[str]:
    """Generate after `prompt_ids` and stream the output as text deltas.

    The text is `tokenizer.decode(output ids)` (special tokens skipped), cut just before the
    first of `params.stop` strings; a stop string may span tokens. Text that could be the start
    of a stop string is held back until the next tokens settle it, so nothing past a stop is
    ever emitted, and no delta splits a character.

    Args:
        model: a causal LM following `CausalLM`'s interface.
        tokenizer: the model's tokenizer; its `eos_token_ids` stop generation.
        prompt_ids: the prompt's token ids.
        params: sampling settings and stop conditions.

    Returns:
        A `Generation` yielding non-empty text deltas; its `result` counts tokens, and a stop
        string that ended the output shows as finish_reason "stop" with that string as stop_reason.

    Raises:
        InvalidParameterError, ContextLengthError: as `generate_ids`.
    """
    ids = generate_ids(model, prompt_ids, params, tokenizer.eos_token_ids)
    return Generation(_text_loop(ids, TextStream(tokenizer, params.stop)), ids.result)


def _text_loop(ids: Generation[int], stream: TextStream) -> Generator[str, None, None]:
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
