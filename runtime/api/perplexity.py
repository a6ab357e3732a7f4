"""Sliding-window perplexity of a model on a token sequence: the quality yardstick for quantization.

Windows of `window` tokens advance by `stride`; each window scores only the tokens the previous
one did not, with up to `window - stride` tokens of context before them (the method of
transformers' perplexity guide). Every token after the first is scored exactly once. It does not
tokenize or read files: callers pass token ids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from .generate import LanguageModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity, and what it was computed over.

    Attributes:
        perplexity: exp of the mean negative log-likelihood per scored token.
        nll: that mean negative log-likelihood, in nats.
        tokens: how many tokens were scored (all but the first).
        window: tokens per window.
        stride: tokens each window advanced.
    """

    perplexity: float
    nll: float
    tokens: int
    window: int
    stride: int


def perplexity(
    model: LanguageModel,
    token_ids: list[int],
    *,
    window: int = 1024,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on `token_ids` with a sliding window.

    Args:
        model: a causal LM following `CausalLM`'s interface.
        token_ids: the text's token ids; at least two.
        window: tokens per forward pass; capped at the model's context.
        stride: how far each window advances, below `window` (default: half the window).
            Smaller strides give each scored token more context and cost more passes.
        progress: log a line per window (window count, tokens scored, running perplexity) at
            INFO; without it the same lines go to DEBUG.

    Returns:
        The perplexity and its accounting.

    Raises:
        InvalidParameterError: fewer than two tokens, or a window or stride out of range.
    """
    window = min(window, model.config.max_position_embeddings)
    stride = stride or max(1, window // 2)
    if len(token_ids) < 2:
        raise InvalidParameterError(f"perplexity needs at least 2 tokens, got {len(token_ids)}; pass a longer text")
    if window < 2 or not 1 <= stride < window:
        raise InvalidParameterError(
            f"window must be >= 2 and stride in [1, window - 1] (each window needs context it "
            f"does not score); got window {window}, stride {stride}"
        )
    ids = torch.tensor(token_ids, dtype=torch.long)
    total_nll, scored, scored_until = 0.0, 0, 1  # token 0 has no context and is never scored
    n_windows = 1 + math.ceil(max(0, len(ids) - window) / stride)
    for i in range(n_windows):
        start = i * stride
        end = min(start + window, len(ids))
        chunk = ids[start:end][None]  # [1, T]
        with torch.inference_mode():
            logits = model(chunk).float()  # [1, T, V]
        # Position t predicts token t+1; score only targets not scored by an earlier window.
        first_new = scored_until - start  # index in the chunk of the first unscored target
        targets = chunk[0, first_new:]
        predictions = logits[0, first_new - 1 : -1]
        total_nll += F.cross_entropy(predictions, targets, reduction="sum").item()
        scored += targets.numel()
        scored_until = end
        logger.log(
            logging.INFO if progress else logging.DEBUG, "window %d/%d: %d tokens, running perplexity %.4f",
            i + 1, n_windows, scored, math.exp(total_nll / scored),
        )
    nll = total_nll / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored, window=window, stride=stride)
