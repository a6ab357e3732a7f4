"""Sampling: pure functions that pick the next token from one logits row (the per-request settings,
`SamplingParams`, live in the torch-free `sampling_params.py` and are re-exported here).

The processors follow transformers' semantics and order (repetition penalty, then temperature,
top-k, top-p), so a seeded request means the same thing here as in `model.generate`. Every random
draw takes an explicit `torch.Generator`; nothing reads or changes the global RNG. This file does
not run the model, handle text or decide when generation stops: stop strings and stop tokens are
only carried in `SamplingParams` for `generate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError, RequestFailedError
from ..text.sampling_params import (  # noqa: F401 - re-exported: the processors' callers import them from here
    GREEDY_TEMPERATURE, MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_STOP_LENGTH, MAX_STOP_STRINGS,
    MIN_REPETITION_PENALTY, SAMPLING_DEFAULTS, SamplingParams,
)


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability, and the most likely tokens with theirs (ids only).

    Attributes:
        logprob: the sampled token's log-probability.
        top: `(token id, logprob)` of the most likely tokens, most likely first (as many as the
            request's `SamplingParams.logprobs`).
    """

    logprob: float
    top: list[tuple[int, float]]


def apply_repetition_penalty(
    logits: torch.Tensor, prev_ids: Sequence[int] | torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalize every token that already occurs, as transformers' `RepetitionPenaltyLogitsProcessor`.

    Each distinct id in `prev_ids` is penalized once, however often it occurs: a positive logit is
    divided by `penalty`, a negative one multiplied. Ids outside the logits' vocabulary are
    ignored, as transformers does, since the model cannot produce them anyway.

    Args:
        logits: one row of logits [V].
        prev_ids: the prompt and the tokens generated so far.
        penalty: > 0; 1.0 returns the logits unchanged.

    Returns:
        A new logits row [V]; the input is not modified.
    """
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits
    ids = torch.as_tensor(prev_ids, dtype=torch.long, device=logits.device).unique()
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by `temperature` (> 0), as transformers' `TemperatureLogitsWarper`.

    Where that overflows float32 (a small temperature over large logits), the logits are first
    shifted so that their largest is 0: the same distribution, with the overflow going to -inf
    (probability 0) instead of +inf.

    Raises:
        InvalidParameterError: `temperature` is not > 0 (greedy decoding is `sample`'s business).
    """
    if not temperature > 0:
        raise InvalidParameterError(
            f"apply_temperature needs temperature > 0, got {temperature!r}; temperature 0 means greedy, "
            "which sample() handles by argmax"
        )
    scaled = logits / temperature
    if bool(torch.isposinf(scaled).any()) and not bool(torch.isposinf(logits).any()):
        scaled = (logits - logits.max()) / temperature
    return scaled


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    """The softmax of one row of processed logits, guarded so that it is always a distribution.

    +inf logits (an overflow upstream) share the whole mass, which is softmax's limit; a row
    with NaN, or with nothing but -inf, has no distribution and is an error.

    Raises:
        RequestFailedError: the row holds NaN or no finite or +inf value (the model's output is
            broken for this request).
    """
    if bool(torch.isnan(scores).any()):
        raise RequestFailedError("the model produced NaN logits for this request; nothing can be sampled from them")
    top = scores.max()
    if bool(torch.isposinf(top)):
        mass = torch.isposinf(scores).float()
        return mass / mass.sum()
    if bool(torch.isneginf(top)):
        raise RequestFailedError("every token's logit is -inf for this request; nothing can be sampled")
    return torch.softmax(scores, dim=-1)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf, as transformers' `TopKLogitsWarper`.

    Tokens tied with the k-th largest are all kept, so more than k may survive. `k` of 0, or at
    least the vocabulary size, keeps everything.

    Args:
        logits: logits [..., V].
        k: how many of the most likely tokens to keep; 0 = off.

    Returns:
        The filtered logits [..., V].
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p`, as transformers'
    `TopPLogitsWarper`; the rest become -inf. The most likely token always survives.

    Args:
        logits: logits [..., V].
        p: in (0, 1]; 1.0 keeps everything.

    Returns:
        The filtered logits [..., V].
    """
    if p >= 1.0:
        return logits
    # Ascending order: drop the low tail while its cumulative mass stays within 1 - p.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prev_ids: Sequence[int] | torch.Tensor = (),
) -> int:
    """Pick the next token from one logits row.

    The repetition penalty applies in both modes (as in transformers). Greedy (temperature 0)
    then takes the argmax, the first on ties; otherwise temperature, top-k and top-p filter the
    logits and one token is drawn from their softmax with `generator`.

    Args:
        logits: the model's logits for the next position [V], any float dtype.
        params: the request's sampling settings.
        generator: the request's random generator, on the logits' device.
        prev_ids: the prompt and the tokens generated so far (for the repetition penalty).

    Returns:
        The chosen token id.

    Raises:
        RequestFailedError: the logits hold NaN, or no token can be drawn (see `probabilities`).
    """
    # Sample in fp32: bf16 logits make softmax and cumsum too coarse for top-p.
    scores = apply_repetition_penalty(logits.float(), prev_ids, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(scores))
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    probs = probabilities(scores)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def logprobs(logits: torch.Tensor, token: int, k: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under `logits`, and the `k` most likely tokens with theirs.

    Which distribution this is (raw model logits, or after the processors) is the caller's
    choice: pass the logits it means.

    Args:
        logits: one row of logits [V].
        token: the id whose log-probability to report.
        k: how many top alternatives to list; 0 lists none.

    Returns:
        `(logprob of token, [(id, logprob), ...] most likely first)`.

    Raises:
        InvalidParameterError: `token` is outside the vocabulary, or `k` < 0.
    """
    vocab = logits.shape[-1]
    if not 0 <= token < vocab:
        raise InvalidParameterError(f"token id {token} is outside the vocabulary [0, {vocab})")
    if k < 0:
        raise InvalidParameterError(f"k must be >= 0, got {k}; use 0 for no alternatives")
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(k, vocab)) if k else None
    alternatives = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logp[token]), alternatives


def batch_logprobs(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """What `logprobs(logits[i], tokens[i], ks[i])` gives for each row, in one batched pass.

    The engine calls it only for the rows whose request asked (`SamplingParams.logprobs`), with
    the raw logits the rows sampled from, so the others pay nothing.

    Args:
        logits: the rows' logits [L, V].
        tokens: each row's sampled token id (inside the vocabulary).
        ks: how many top alternatives each row lists.

    Returns:
        One `TokenLogprobs` per row, in row order.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [L, V]
    index = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = logp.gather(-1, index[:, None]).squeeze(-1).tolist()  # [L]
    k = min(max(ks, default=0), logp.shape[-1])
    values, ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0])  # [L, k]
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprobs(chosen[i], [(int(t), v) for t, v in zip(ids[i][: ks[i]], values[i][: ks[i]])])
        for i in range(len(chosen))
    ]


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    prev_ids: Sequence[Sequence[int]],
) -> list[int | Exception]:
    """Pick the next token of each row of a batch, each with its own settings and generator.

    Row i gets exactly what `sample(logits[i], params[i], generators[i], prev_ids[i])` gives:
    the same processors, and one draw from its own generator, so a seeded request yields the
    same tokens alone or in any batch. Greedy rows without a repetition penalty take one
    batched argmax. A row whose sampling fails gets its exception in place of a token, so one
    request's failure stays its own.

    Args:
        logits: one row of logits per request [L, V].
        params: each row's sampling settings.
        generators: each row's random generator, on the logits' device.
        prev_ids: each row's prompt and output so far (read only for a repetition penalty).

    Returns:
        The chosen token ids in row order, or the exception that row raised.
    """
    tokens: list[int | Exception] = [0] * len(params)
    # A NaN row has no argmax worth the name either: greedy rows are checked too, in one pass.
    broken = set(torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist())
    for i in broken:
        tokens[i] = RequestFailedError("the model produced NaN logits for this request; nothing can be sampled from them")
    plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0 and i not in broken]
    if plain:
        picks = torch.argmax(logits[plain].float(), dim=-1).tolist()
        for i, token in zip(plain, picks):
            tokens[i] = token
    for i, p in enumerate(params):
        if not (p.greedy and p.repetition_penalty == 1.0) and i not in broken:
            try:
                tokens[i] = sample(logits[i], p, generators[i], prev_ids[i])
            except Exception as e:  # noqa: BLE001 - the row's own failure, reported for that request
                tokens[i] = e
    return tokens
