"""Perplexity of an exported model, in numpy: the sliding windows of `runtime.perplexity`.

The same windows, stride and scoring (each token scored once, by the first window that sees it
with context) as the torch runtime's `perplexity`, so the two figures compare directly; this
file only scores, it does not tokenize.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidParameterError
from .model import EdgeModel


def window_and_stride(model: EdgeModel, window: int = 1024, stride: int | None = None) -> tuple[int, int]:
    """The window (capped at the model's context) and stride (default: half the window) `perplexity` uses."""
    window = min(window, model.manifest.context_length)
    return window, stride or max(1, window // 2)


def perplexity(model: EdgeModel, token_ids: list[int], *, window: int = 1024, stride: int | None = None) -> float:
    """Perplexity of `model` on `token_ids` (exp of the mean negative log-likelihood per scored token).

    Args:
        model: the exported model.
        token_ids: the text's ids; at least two.
        window: tokens per forward pass; capped at the model's context.
        stride: how far each window advances (default: half the window).

    Returns:
        The perplexity.

    Raises:
        InvalidParameterError: fewer than two tokens, or a window or stride out of range.
    """
    window, stride = window_and_stride(model, window, stride)
    if len(token_ids) < 2:
        raise InvalidParameterError(f"perplexity needs at least 2 tokens, got {len(token_ids)}; pass a longer text")
    if window < 2 or not 1 <= stride < window:
        raise InvalidParameterError(f"window must be >= 2 and stride in [1, window - 1]; got window {window}, stride {stride}")
    ids = np.asarray(token_ids, dtype=np.int64)
    total, scored, scored_until = 0.0, 0, 1
    for i in range(1 + math.ceil(max(0, len(ids) - window) / stride)):
        start = i * stride
        end = min(start + window, len(ids))
        logits = model.logits(ids[start:end].tolist()).astype(np.float64)  # [T, V]
        first_new = scored_until - start
        targets = ids[start:end][first_new:]
        rows = logits[first_new - 1 : -1]
        top = rows.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
        total += float((log_z - rows[np.arange(len(targets)), targets]).sum())
        scored += len(targets)
        scored_until = end
    return math.exp(total / scored)
