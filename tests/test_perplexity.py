"""Sliding-window perplexity against transformers' documented method on the same model."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.api.perplexity import perplexity

from .test_model import save_hf_model


def transformers_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The loop of transformers' perplexity guide, counting tokens exactly."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("length, window, stride", [(100, 32, 16), (97, 40, 7), (20, 64, 32), (64, 32, 31)])
def test_matches_transformers_sliding_window(tmp_path, length, window, stride):
    hf, path = save_hf_model(tmp_path, "llama")
    ids = torch.randint(0, 256, (1, length))
    expected, n_tokens = transformers_perplexity(hf, ids, window, stride)
    result = perplexity(load_model(path), ids[0].tolist(), window=window, stride=stride)
    assert result.tokens == n_tokens == length - 1
    assert math.isclose(result.perplexity, expected, rel_tol=1e-5), (result.perplexity, expected)


def test_uniform_logits_give_the_vocabulary_size(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    model = load_model(path)
    with torch.no_grad():  # a zero head gives every token the same logit
        model.lm_head.weight.zero_()
    result = perplexity(model, torch.randint(0, 256, (60,)).tolist(), window=32, stride=16)
    assert result.perplexity == pytest.approx(256, rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"window": 1}, "window"), ({"window": 16, "stride": 16}, "stride")])
def test_bad_windows(tmp_path, kwargs, match):
    _, path = save_hf_model(tmp_path, "llama")
    with pytest.raises(InvalidParameterError, match=match):
        perplexity(load_model(path), list(range(50)), **kwargs)


def test_too_short(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    with pytest.raises(InvalidParameterError, match="at least 2 tokens"):
        perplexity(load_model(path), [5])


def test_progress_is_logged_not_printed(tmp_path, caplog, capsys):
    _, path = save_hf_model(tmp_path, "llama")
    model = load_model(path)
    capsys.readouterr()  # drop what set-up printed
    caplog.set_level(logging.DEBUG, logger="quadapt")
    result = perplexity(model, list(range(100)), window=32, stride=16, progress=True)
    windows = [r for r in caplog.records if r.name == "quadapt.runtime.api.perplexity"]
    assert [r.levelno for r in windows] == [logging.INFO] * 6  # 1 + ceil((100 - 32) / 16) windows
    assert windows[-1].getMessage() == f"window 6/6: 99 tokens, running perplexity {result.perplexity:.4f}"
    caplog.clear()
    perplexity(model, list(range(100)), window=32, stride=16)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] * 6  # without progress, for -v only
    assert capsys.readouterr() == ("", "")
