"""Logprobs: what the engine reports for each output token, checked against the model's own logits.

The reference is a full forward pass of the loaded model over the prompt and the output so far,
with no cache and no batching: its log-softmax at each position is what every token's logprob and
top list must equal (the raw distribution, before the repetition penalty, temperature, top-k and
top-p). The text layer must keep each logprob with the delta that releases its token's text.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.api.llm import LLM, GenerateRequest
from quadapt.runtime.api.outputs import OutputProcessor, TokenLogprob
from quadapt.runtime.engine.engine import RequestOutput
from quadapt.runtime.engine.sampling import (
    SamplingParams, TokenLogprobs, batch_logprobs, logprobs, sample_batch,
)
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.serving.http_openai import MIN_LOGPROB, logprobs_object
from quadapt.runtime.text.tokenizer import Tokenizer

from .conftest import assert_close
from .test_adapters import make_base
from .test_llm import make_engine

PROMPT = "hello world"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("logprobs-base"))


@pytest.fixture(scope="module")
def tokenizer(base) -> Tokenizer:
    return Tokenizer.from_files(open_checkpoint(base).tokenizer_files())


@pytest.fixture(scope="module")
def model(base):
    return load_model(base)


def reference_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each output position [N, V], in one uncached pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids], dtype=torch.long))[0]  # [T, V]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(output_ids)]


def test_batch_logprobs_equals_logprobs_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 64) * 4
    tokens, ks = [3, 0, 63, 17, 8], [0, 3, 20, 1, 64]
    for row, got in enumerate(batch_logprobs(logits, tokens, ks)):
        logprob, top = logprobs(logits[row], tokens[row], ks[row])
        assert got.logprob == pytest.approx(logprob, abs=1e-6)
        assert [t for t, _ in got.top] == [t for t, _ in top] and len(top) == min(ks[row], 64)
        assert_close(torch.tensor([v for _, v in got.top]), torch.tensor([v for _, v in top]))


def test_params_check_logprobs():
    assert SamplingParams().logprobs is None and SamplingParams(logprobs=0).logprobs == 0
    for bad in (-1, 21, 2.0, True, "5"):
        with pytest.raises(InvalidParameterError, match=r"logprobs must be None or an integer in \[0, 20\]"):
            SamplingParams(logprobs=bad)


def test_sampling_is_the_same_with_or_without_logprobs():
    torch.manual_seed(1)
    logits = torch.randn(2, 64)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=9, seed=4)):
        picks = []
        for asked in (None, 5):
            p = SamplingParams(**{**params.__dict__, "logprobs": asked})
            generator = torch.Generator().manual_seed(4)
            picks.append(sample_batch(logits[:1], [p], [generator], [()]))
        assert picks[0] == picks[1]


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},
    {"temperature": 0.9, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 11},
], ids=["greedy", "sampled"])
def test_engine_logprobs_are_the_raw_models_log_softmax(settings, base, tokenizer, model):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=5, **settings)
    llm = LLM.from_engine(make_engine(base), tokenizer)
    plain, asked = llm.generate([GenerateRequest(PROMPT, SamplingParams(**{**params.__dict__, "logprobs": None})),
                                 GenerateRequest(PROMPT, params)])
    assert plain.logprobs is None and asked.token_ids == plain.token_ids  # asking changes no token
    assert [lp.token_id for lp in asked.logprobs] == asked.token_ids and len(asked.token_ids) == 10
    reference = reference_logprobs(model, tokenizer.encode_prompt(PROMPT), asked.token_ids)
    for position, (lp, row) in enumerate(zip(asked.logprobs, reference)):
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4), position
        if params.greedy:  # no penalty: the greedy pick is the raw argmax
            assert lp.logprob == pytest.approx(float(row.max()), abs=1e-4)
        top = torch.topk(row, 5)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist(), position
        values = [t.logprob for t in lp.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert_close(torch.tensor(values), top.values)
        assert lp.token == tokenizer.decode([lp.token_id], skip_special_tokens=False)
        assert all(t.top_logprobs == [] for t in lp.top_logprobs)


def test_streamed_logprobs_equal_unstreamed_and_follow_their_text(base, tokenizer):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2)
    llm = LLM.from_engine(make_engine(base), tokenizer)
    [done] = llm.generate([GenerateRequest(PROMPT, params)])
    deltas = list(llm.stream(PROMPT, params))
    assert [lp for d in deltas for lp in d.logprobs] == done.logprobs
    assert all(d.text or d.finished for d in deltas if d.logprobs)  # none rides a delta with no text but the last


class _Engine:
    """What `OutputProcessor` needs of an engine: somewhere to abort a request at its stop string."""

    def abort(self, request_id: str) -> bool:
        return True


def _deltas(tokenizer, token_ids: list[int], stop: list[str]) -> list:
    """The text deltas of an output made of `token_ids`, one per step, each token's logprob -its position."""
    processor = OutputProcessor(_Engine(), tokenizer)
    processor.add("r", SamplingParams(stop=stop, logprobs=0))
    deltas = []
    for i, token in enumerate(token_ids):
        last = i == len(token_ids) - 1
        out = RequestOutput("r", [token], last, "length" if last else None, None, False, 1, i + 1,
                            logprobs=[TokenLogprobs(-float(i), [])])
        deltas += processor.process([out])
        if deltas[-1].finished:
            break
    return deltas


TEXT = "hello world, bïg"  # ï is two byte tokens: "\xc3" then "\xaf"
NAMES = ["he", "ll", "o", " wor", "ld", ",", " ", "b", "\ufffd", "\ufffd", "g"]


@pytest.mark.parametrize("stop, kept", [
    ([], 11),
    (["ld, b"], 4),  # held back, then wholly in the stop string: left out
    (["o wo"], 2),
    (["rld"], 4),  # " wor" shows " wo" before the stop string: kept
    (["ïg"], 8),  # both halves of ï wait for their text, which is the stop string's
    (["g"], 10),  # both halves of ï go out with "ï"
    (["bï"], 7),
], ids=["none", "held-then-stopped", "one-token-stop", "split-token", "character-in-stop", "character-out",
        "character-ends-stop"])
def test_each_logprob_goes_with_the_delta_that_releases_its_text(tokenizer, stop, kept):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert [tokenizer.decode([i], skip_special_tokens=False) for i in ids] == NAMES
    deltas = _deltas(tokenizer, ids, stop)
    got = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in got] == NAMES[:kept] and [lp.token_id for lp in got] == ids[:kept]
    assert [lp.logprob for lp in got] == [-float(i) for i in range(kept)]
    for d in deltas:  # a logprob rides with text of its token's, or with the last delta
        assert not d.logprobs or d.text or d.finished
    assert "".join(d.text for d in deltas) == (TEXT[: TEXT.index(stop[0])] if stop else TEXT)
    if not stop:  # the first half of ï waits for the second
        assert [lp.token for lp in next(d for d in deltas if "ï" in d.text).logprobs] == NAMES[8:10]


def test_at_a_stop_string_the_engine_logprobs_stop_with_the_text(base, tokenizer):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0)
    llm = LLM.from_engine(make_engine(base), tokenizer)
    [full] = llm.generate([GenerateRequest(PROMPT, params)])
    stop = full.text[3:5]
    [stopped] = llm.generate([GenerateRequest(PROMPT, SamplingParams(**{**params.__dict__, "stop": [stop]}))])
    assert stopped.text == full.text[: full.text.index(stop)] and stopped.finish_reason == "stop"
    kept = [lp.token_id for lp in stopped.logprobs]
    assert kept == full.token_ids[: len(kept)] and 0 < len(kept) < len(stopped.token_ids) <= len(full.token_ids)
    assert [lp.logprob for lp in stopped.logprobs] == [lp.logprob for lp in full.logprobs[: len(kept)]]


def test_the_wire_shapes_write_minus_infinity_as_json_can():
    ruled_out = TokenLogprob(7, "x", -math.inf)
    lp = TokenLogprob(3, "é", -0.5, [TokenLogprob(3, "é", -0.5), ruled_out])
    chat = logprobs_object(True, [lp])
    assert chat["content"][0] == {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9], "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]}, {"token": "x", "logprob": MIN_LOGPROB, "bytes": [0x78]}]}
    legacy = logprobs_object(False, [lp, lp], text_offset=4)
    assert legacy == {"tokens": ["é", "é"], "token_logprobs": [-0.5, -0.5], "top_logprobs": [{"é": -0.5, "x": MIN_LOGPROB}] * 2,
                      "text_offset": [4, 5]}
    json.dumps([chat, legacy], allow_nan=False)
    assert logprobs_object(True, None) is None
