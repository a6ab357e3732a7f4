"""Generation at the edge: the reference generator's loop (`runtime.generation`) over an `EdgeModel`.

`generate_ids` prefills the prompt, then feeds back one sampled token per step until eos, a stop
token, `max_new_tokens` or the context: the loop, its stop checks and its counting are the ones
`runtime.generate.generate_ids` runs, shared, so the two stop on the same token; `generate_text`
streams the output as text cut at stop strings through the shared `TextStream`. Both return a
`Generation` whose `result` says how it ended. Greedy steps touch no random generator and copy
nothing but the token id; sampling works on the logits view in numpy (`sampling.py`).

This file only binds the onnxruntime sequence and the numpy sampler to that loop: no batching,
no server, no torch.
"""

from __future__ import annotations

import numpy as np

from ..text.generation import Generation, GenerationResult, check_prompt_ids, decode_loop, refuse_logprobs, text_loop
from ..text.sampling_params import SamplingParams
from ..text.tokenizer import Tokenizer
from .model import EdgeModel, Sequence
from .sampling import sample


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
        UnsupportedError: `params.logprobs` is set (the engine reports them; the edge does not).
    """
    refuse_logprobs(params, "the edge runtime")
    manifest = model.manifest
    context = manifest.context_length
    prompt = check_prompt_ids(prompt_ids, manifest.vocab_size, context)
    model.adapter_inputs(adapter)  # an unknown adapter fails here, not at the first step
    # The last sampled token is never fed back, so prompt + max_new_tokens - 1 positions suffice.
    capacity = min(len(prompt) + params.max_new_tokens - 1, context)
    sequence: Sequence | None = None

    def forward(ids: list[int]) -> np.ndarray:
        nonlocal sequence
        if sequence is None:  # the prompt: opening the sequence prefills it
            sequence = model.start(ids, capacity, adapter)
            return sequence.logits
        return sequence.step(ids[0])

    rng = np.random.default_rng(params.seed)
    plain_greedy = params.greedy and params.repetition_penalty == 1.0

    def pick(logits: np.ndarray, seen: list[int]) -> int:
        return int(np.argmax(logits)) if plain_greedy else sample(logits, params, rng, seen)

    result = GenerationResult(prompt_tokens=len(prompt))
    return Generation(decode_loop(forward, pick, prompt, params, set(eos_token_ids), result, context), result)


def generate_text(
    model: EdgeModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter: str | None = None,
) -> Generation[str]:
    """Generate after `prompt_ids` and stream the output as text deltas, cut before the first of
    `params.stop` (a stop string that ends it shows as finish_reason "stop" with that string).

    Args:
        model: the exported model.
        tokenizer: the export's tokenizer (`Tokenizer.from_dir` on the export's folder); its
            `eos_token_ids` stop generation.
        prompt_ids: the prompt's ids (`tokenizer.encode_prompt`).
        params: sampling settings and stop conditions.
        adapter: one of the export's adapters, or None for the base model.

    Raises:
        InvalidParameterError, ContextLengthError: as `generate_ids`.
    """
    ids = generate_ids(model, prompt_ids, params, tokenizer.eos_token_ids, adapter)
    return text_loop(ids, tokenizer, params.stop)
