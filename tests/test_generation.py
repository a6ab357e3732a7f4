"""The shared decode loop (`runtime.generation`): the order of its stop checks and its counting.

The reference generator and the edge runtime both run `decode_loop`; here it runs over a scripted
model (the tokens it picks are fixed), so each way a generation ends is checked on its own.
"""

from __future__ import annotations

import pytest

from quadapt.runtime.errors import ContextLengthError, InvalidParameterError
from quadapt.runtime.text.generation import Generation, GenerationResult, check_prompt_ids, decode_loop, text_loop
from quadapt.runtime.text.sampling_params import SamplingParams


class Scripted:
    """A model that records what it is fed and picks the next token from a script."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.fed, self.seen = list(script), [], []

    def forward(self, ids: list[int]) -> int:
        self.fed.append(list(ids))
        return len(self.fed) - 1  # the "logits": the step's index

    def pick(self, step: int, seen: list[int]) -> int:
        self.seen.append(list(seen))
        return self.script[step]


def run(script, prompt=(1, 2), context=100, eos=frozenset({0}), **params) -> tuple[list[int], GenerationResult, Scripted]:
    model = Scripted(script)
    result = GenerationResult(prompt_tokens=len(prompt))
    loop = decode_loop(model.forward, model.pick, list(prompt), SamplingParams(**params), set(eos), result, context)
    return list(Generation(loop, result)), result, model


def test_eos_stops_and_counts_but_is_not_output():
    out, result, model = run([5, 6, 0, 7])
    assert out == [5, 6]
    assert (result.finish_reason, result.stop_reason, result.completion_tokens) == ("stop", 0, 3)
    assert model.fed == [[1, 2], [5], [6]]  # the prompt once, then each token; the eos never fed
    assert model.seen[-1] == [1, 2, 5, 6]  # the penalty sees prompt and output


def test_ignore_eos_and_stop_token_ids():
    out, result, _ = run([5, 0, 9, 7], ignore_eos=True, stop_token_ids=[9])
    assert out == [5, 0] and (result.finish_reason, result.stop_reason, result.completion_tokens) == ("stop", 9, 3)


def test_max_new_tokens_ends_with_length_and_the_last_token_is_not_fed():
    out, result, model = run([5, 6, 7, 8], max_new_tokens=3)
    assert out == [5, 6, 7] and (result.finish_reason, result.context_full, result.completion_tokens) == ("length", False, 3)
    assert model.fed == [[1, 2], [5], [6]]


def test_a_full_context_ends_with_length_and_says_so():
    out, result, _ = run([5, 6, 7, 8], context=4, max_new_tokens=10)
    assert out == [5, 6] and (result.finish_reason, result.context_full) == ("length", True)
    # Both limits on the same token: max_new_tokens is what was asked, so the context is not blamed.
    _, result, _ = run([5, 6, 7, 8], context=4, max_new_tokens=2)
    assert (result.finish_reason, result.context_full) == ("length", False)


def test_text_loop_ends_at_a_stop_string_and_closes_the_ids():
    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    model = Scripted([0, 1, 2, 3, 4, 5])
    result = GenerationResult(prompt_tokens=1)
    ids = Generation(decode_loop(model.forward, model.pick, [0], SamplingParams(ignore_eos=True), set(), result, 99), result)
    text = text_loop(ids, Letters(), ["cd"])
    assert "".join(text) == "ab"
    assert (result.finish_reason, result.stop_reason, result.completion_tokens) == ("stop", "cd", 4)
    with pytest.raises(StopIteration):
        next(ids)  # closed with the text


def test_check_prompt_ids():
    assert check_prompt_ids((1, 2), vocab_size=10, context=3) == [1, 2]
    with pytest.raises(InvalidParameterError, match="prompt_ids is empty"):
        check_prompt_ids([], 10, 3)
    with pytest.raises(InvalidParameterError, match=r"prompt ids \[10, -1\] are outside the model's vocabulary \[0, 10\)"):
        check_prompt_ids([1, 10, -1], 10, 30)
    with pytest.raises(ContextLengthError, match="shorten the prompt to at most 2 tokens"):
        check_prompt_ids([1, 2, 3], 10, 3)
