"""Sampling against transformers' logits processors, on the same random logits, ties and edges included."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from quadapt.runtime.errors import InvalidParameterError, QuadaptError
from quadapt.runtime.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    logprobs,
    sample,
)

from .conftest import assert_close

V = 64


def random_logits(seed: int, ties: bool = False) -> torch.Tensor:
    """A logits row [V] with both signs and exact zeros; with `ties`, many equal values."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 3
    logits[::9] = 0.0
    if ties:
        logits = logits.round()  # a few distinct integers, each shared by several tokens
    return logits


LOGITS = [
    pytest.param(random_logits(seed, ties), id=f"seed{seed}{'-ties' if ties else ''}")
    for seed in (0, 1)
    for ties in (False, True)
]


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_equals_transformers(logits, penalty):
    # Repeats, the prompt, and an id past the vocabulary (ignored by both).
    prev = [3, 9, 3, 27, 0, 63, 9, V + 5]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prev]), logits[None].clone())[0]
    actual = apply_repetition_penalty(logits, prev, penalty)
    assert torch.equal(actual, expected)
    assert actual[3] != logits[3] or penalty == 1.0 or logits[3] == 0
    assert actual[5] == logits[5], "a token never seen is untouched"


def test_repetition_penalty_leaves_input_alone():
    logits = random_logits(0)
    before = logits.clone()
    apply_repetition_penalty(logits, [1, 2, 3], 2.0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_equals_transformers(logits, temperature):
    expected = TemperatureLogitsWarper(temperature)(None, logits[None])[0]
    assert torch.equal(apply_temperature(logits, temperature), expected)


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("k", [1, 2, 5, V - 1, V, V + 7])
def test_top_k_equals_transformers(logits, k):
    expected = TopKLogitsWarper(k)(None, logits[None])[0]
    actual = apply_top_k(logits, k)
    assert torch.equal(actual, expected)
    assert (actual > -math.inf).sum() >= min(k, V), "ties with the k-th are kept, so at least k survive"


def test_top_k_zero_is_off():
    logits = random_logits(0)
    assert torch.equal(apply_top_k(logits, 0), logits)


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("p", [1e-9, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_equals_transformers(logits, p):
    expected = TopPLogitsWarper(p)(None, logits[None])[0]
    actual = apply_top_p(logits, p)
    assert torch.equal(actual, expected)
    assert (actual > -math.inf).sum() >= 1, "the most likely token always survives"


def test_top_p_near_zero_keeps_only_the_most_likely():
    logits = random_logits(3)
    kept = apply_top_p(logits, 1e-9) > -math.inf
    assert kept.sum() == 1 and kept[logits.argmax()]


def test_top_p_after_top_k_equals_transformers():
    # -inf entries from top-k must not disturb top-p's cumulative mass.
    logits = random_logits(4)
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, logits[None]))[0]
    assert torch.equal(apply_top_p(apply_top_k(logits, 10), 0.8), expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.5, top_p=0.5),
        SamplingParams(temperature=0.9, top_k=3, repetition_penalty=0.8),
    ],
    ids=["all", "plain", "top_p", "top_k"],
)
def test_sample_draws_what_transformers_would(params):
    """Same processors in transformers' order, then the same multinomial draw from the same seed."""
    prev = [1, 5, 5, 17, 40]
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    if params.temperature != 1.0:
        hf.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        hf.append(TopPLogitsWarper(params.top_p))
    for seed in range(20):
        logits = random_logits(100 + seed)
        scores = hf(torch.tensor([prev]), logits[None].clone())
        expected = int(torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator().manual_seed(seed)))
        assert sample(logits, params, torch.Generator().manual_seed(seed), prev) == expected


def test_greedy_is_argmax_of_penalized_logits_and_ignores_the_generator():
    logits = random_logits(5)
    prev = [int(logits.argmax())]  # penalizing the best token moves the argmax
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.01, repetition_penalty=10.0)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample(logits, params, g, prev) == int(apply_repetition_penalty(logits, prev, 10.0).argmax())
    assert sample(logits, params, g, prev) != prev[0]
    assert torch.equal(g.get_state(), state), "greedy decoding draws no random numbers"


def test_greedy_takes_the_first_of_tied_maxima():
    logits = torch.zeros(V)
    logits[[7, 30]] = 2.0
    assert sample(logits, SamplingParams(temperature=0), torch.Generator()) == 7


def test_sample_accepts_half_precision_logits():
    logits = random_logits(6).to(torch.bfloat16)
    token = sample(logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator().manual_seed(0))
    assert token == int(logits.float().argmax())


def test_logprobs():
    logits = random_logits(7)
    expected = torch.log_softmax(logits, -1)
    lp, top = logprobs(logits, 11, k=3)
    assert lp == pytest.approx(float(expected[11]))
    assert [t for t, _ in top] == expected.topk(3).indices.tolist()
    assert_close(torch.tensor([v for _, v in top]), expected.topk(3).values)
    assert logprobs(logits, 0)[1] == []
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        logprobs(logits, V)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-2]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_params_raise_clear_errors(kwargs, names):
    with pytest.raises(InvalidParameterError) as excinfo:
        SamplingParams(**kwargs)
    message = str(excinfo.value)
    assert names in message and repr(next(iter(kwargs.values()))) in message
    assert isinstance(excinfo.value, QuadaptError) and isinstance(excinfo.value, ValueError)


def test_params_normalize_and_freeze():
    params = SamplingParams(stop="\n", stop_token_ids=(4, 5))
    assert params.stop == ["\n"] and params.stop_token_ids == [4, 5]
    assert SamplingParams().greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.7).greedy
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]
