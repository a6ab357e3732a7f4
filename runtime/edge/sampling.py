"""Sampling in numpy: the same settings, processors and order as `runtime/sampling.py`, without torch.

`SamplingParams` takes the same fields as the torch runtime's and checks them the same way; the
processors (repetition penalty, temperature, top-k, top-p) compute what their torch namesakes do
(a test holds them to it). Greedy is the argmax, first on ties, as there. Draws come from a
numpy `Generator` seeded per request, so a seed reproduces the edge runtime's own output; it does
not reproduce the torch runtime's draws, whose generator differs.

This file does not run the model or decide when to stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidParameterError

_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop: the fields and meaning of
    `quadapt.runtime.sampling.SamplingParams` (see there)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def whole(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidParameterError(
                f"max_new_tokens (--max-new-tokens) must be an integer >= 1, got {self.max_new_tokens!r}; ask for at least one token"
            )
        if not real(self.temperature) or self.temperature < 0:
            raise InvalidParameterError(f"temperature must be a finite number >= 0, got {self.temperature!r}; use 0 for greedy decoding")
        if not whole(self.top_k) or self.top_k < 0:
            raise InvalidParameterError(f"top_k (--top-k) must be an integer >= 0, got {self.top_k!r}; use 0 to turn it off")
        if not real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError(f"top_p (--top-p) must be in (0, 1], got {self.top_p!r}; use 1.0 to turn it off")
        if not real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidParameterError(
                f"repetition_penalty (--repetition-penalty) must be a finite number > 0, got {self.repetition_penalty!r}; "
                "use 1.0 to turn it off"
            )
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise InvalidParameterError(f"seed must be None or an integer in [0, 2**64 - 1], got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidParameterError(f"stop must be a list of non-empty strings, got {self.stop!r}; an empty string would stop at once")
        object.__setattr__(self, "stop", list(stop))
        if not isinstance(self.stop_token_ids, Sequence) or not all(whole(t) and t >= 0 for t in self.stop_token_ids):
            raise InvalidParameterError(f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameterError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, prev_ids: Sequence[int], penalty: float) -> np.ndarray:
    """As `runtime.sampling.apply_repetition_penalty`: each distinct earlier id once, positive
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
    """As `runtime.sampling.apply_top_k`: logits below the k-th largest become -inf (ties kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """As `runtime.sampling.apply_top_p`: drop the low tail whose cumulative probability stays
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
    """Pick the next token from one logits row [V], as `runtime.sampling.sample` does.

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
    scores = scores / np.float32(params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    probs = _softmax(scores.astype(np.float64))
    return int(rng.choice(probs.shape[-1], p=probs))
