"""The reference generator: one sequence, one token at a time, slow and obviously correct.

`generate_ids` prefills the prompt into a `KVCache`, then feeds back one sampled token per step
until eos, a stop token, `max_new_tokens` or the model's context. It sees token ids only.
`generate_text` runs those ids through a `TextStream` (text_stream.py), which does the text
work: incremental detokenization and stop strings. Both return a `Generation`, an iterator whose
`result` tells the caller, once the iterator is exhausted, why it finished and how many tokens
it used. The loop, its stop checks and the result types are `generation.py`'s, torch-free and
shared with the edge runtime; this file adds the torch model, its cache and torch sampling.

This is the yardstick for the batching engine, which must produce the same tokens for the same
seed; it does not batch, schedule, or share a cache between requests, and it holds no text
logic of its own.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Protocol

import torch
from torch import nn

from ..model.config import ModelConfig
from ..errors import InvalidParameterError
from ..text.generation import Generation, GenerationResult, check_prompt_ids, decode_loop, refuse_logprobs, text_loop
from ..model.kv_cache import KVCache
from ..engine.sampling import SamplingParams, sample
from ..text.tokenizer import Tokenizer


class LanguageModel(Protocol):
    """What the generator needs of a model (`CausalLM` has it): logits [B, T, V] (or the last
    `logits_to_keep` positions) for ids [B, T] placed after the cache's prefix, a `config` with
    the context limit, and parameters."""

    config: ModelConfig

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, logits_to_keep: int = 0) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


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
        UnsupportedError: `params.logprobs` is set (the engine reports them; this loop does not).
    """
    config = model.config
    refuse_logprobs(params, "the reference generator")
    prompt = check_prompt_ids(prompt_ids, config.vocab_size, config.max_position_embeddings)
    weight = _first_float_parameter(model)
    result = GenerationResult(prompt_tokens=len(prompt))
    return Generation(_torch_loop(model, weight, prompt, params, set(eos_token_ids), result), result)


def _torch_loop(
    model: LanguageModel,
    weight: torch.Tensor,
    prompt: list[int],
    params: SamplingParams,
    eos_token_ids: set[int],
    result: GenerationResult,
) -> Generator[int, None, None]:
    """`decode_loop` over a `KVCache` and torch sampling; the cache is allocated on the first step."""
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

    # Per step, not around the loop: a mode held across `yield` would leak into the caller.
    @torch.inference_mode()
    def forward(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids], dtype=torch.long, device=device), cache=cache, logits_to_keep=1)[0, -1]

    @torch.inference_mode()
    def pick(logits: torch.Tensor, seen: list[int]) -> int:
        return sample(logits, params, generator, seen)

    yield from decode_loop(forward, pick, prompt, params, eos_token_ids, result, context)


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
    return text_loop(ids, tokenizer, params.stop)
