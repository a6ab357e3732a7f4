"""Sampling in numpy: the same settings, processors and order as `runtime/engine/sampling.py`, without torch.

`SamplingParams` is the runtime's one (`runtime/text/sampling_params.py`, torch-free); the
processors (repetition penalty, temperature, top-k, top-p) compute what their torch namesakes do
(a test holds them to it). Greedy is the argmax, first on ties, as there. Draws come from a
numpy `Generator` seeded per request, so a seed reproduces the edge runtime's own output; it does
not reproduce the torch runtime's draws, whose generator differs.

This file does not run the model or decide when to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..text.sampling_params import SamplingParams


def apply_repetition_penalty(logits: np.ndarray, prev_ids: Sequence[int], penalty: float) -> np.ndarray:
    """As `runtime.engine.sampling.apply_repetition_penalty`: each distinct earlier id once, positive
    logits divided by `penalty`, negative ones multiplied; returns a new row [V]."""
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits
    ids = np.unique(np.asarray(prev_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """As `runtime.engine.sampling.apply_top_k`: logits below the k-th largest become -inf (ties kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """As `runtime.engine.sampling.apply_top_p`: drop the low tail whose cumulative probability stays
    within 1 - p; the most likely token always survives."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending
    sorted_logits = logits[order]
    cumulative = np.cumsum(_softmax(sorted_logits))
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[-1] = False
    drop = np.empty_like(drop_sorted)
    drop[order] = drop_sorted
    return np.where(drop, -np.inf, logits).astype(logits.dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, prev_ids: Sequence[int] = ()) -> int:
    """Pick the next token from one logits row [V], as `runtime.engine.sampling.sample` does.

    Args:
        logits: the model's logits for the next position [V].
        params: the request's sampling settings.
        rng: the request's random generator (unused when greedy).
        prev_ids: the prompt and the tokens generated so far (for the repetition penalty).

    Returns:
        The chosen token id.
    """
    scores = apply_repetition_penalty(logits.astype(np.float32, copy=False), prev_ids, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(scores))
    scaled = scores / np.float32(params.temperature)
    if np.isposinf(scaled).any() and not np.isposinf(scores).any():  # overflow: shift as the torch side does
        scaled = (scores - scores.max()) / np.float32(params.temperature)
    scores = scaled
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    probs = _softmax(scores.astype(np.float64))
    return int(rng.choice(probs.shape[-1], p=probs))
