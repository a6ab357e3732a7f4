"""Sampling: the per-request settings, and pure functions that pick the next token from one logits row.

The processors follow transformers' semantics and order (repetition penalty, then temperature,
top-k, top-p), so a seeded request means the same thing here as in `model.generate`. Every random
draw takes an explicit `torch.Generator`; nothing reads or changes the global RNG. This file does
not run the model, handle text or decide when generation stops: stop strings and stop tokens are
only carried in `SamplingParams` for `generate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidParameterError, RequestFailedError, quote

# A seed must fit torch.Generator.manual_seed's unsigned 64-bit range.
_MAX_SEED = 2**64 - 1
# A temperature below this is greedy, as in vLLM: dividing logits by less only overflows float32,
# and the distribution is already a point mass on the argmax.
GREEDY_TEMPERATURE = 1e-5
# The repetition penalty's range. A penalty of 100 already takes a repeated token's chance away
# (or, at 0.01, makes it certain); values beyond only push float32 logits towards overflow.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# Stop strings are matched against the text of every new token: their number and length are capped
# so that one request cannot slow the steps of every other.
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    Attributes:
        max_new_tokens: most tokens to sample, counting a final eos or stop token.
        temperature: divides the logits; 0 means greedy (argmax, top-k and top-p ignored), and so
            does any temperature below `GREEDY_TEMPERATURE` (1e-5).
        top_k: keep only the k most likely tokens (ties with the k-th are kept); 0 turns it off.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (always at least one); 1.0 turns it off.
        repetition_penalty: transformers' CTRL-style penalty on every token already in the
            prompt or output: positive logits are divided by it, negative ones multiplied;
            1.0 turns it off, above 1 discourages repeats, below 1 encourages them; in
            [0.01, 100].
        seed: seed of the request's own generator, so the same seed reproduces the same output;
            None draws a fresh nondeterministic seed.
        stop: strings that end the output; the text stops just before the first one. A single
            string is taken as a list of one. At most 16, of at most 256 characters each.
        stop_token_ids: token ids that end the output; the stop token itself is not output (at
            most 256).
        ignore_eos: keep going past the model's eos tokens (stop_token_ids still stop).
    """

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
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidParameterError(
                f"max_new_tokens (--max-new-tokens) must be an integer >= 1, got {quote(self.max_new_tokens)}; "
                "ask for at least one token"
            )
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameterError(
                f"temperature (--temperature) must be a finite number >= 0, got {quote(self.temperature)}; "
                "use 0 for greedy decoding"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameterError(
                f"top_k (--top-k) must be an integer >= 0, got {quote(self.top_k)}; use 0 to turn it off"
            )
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError(
                f"top_p (--top-p) must be in (0, 1], got {quote(self.top_p)}; use 1.0 to turn it off"
            )
        if (
            not _is_real(self.repetition_penalty)
            or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY
        ):
            raise InvalidParameterError(
                f"repetition_penalty (--repetition-penalty) must be in [{MIN_REPETITION_PENALTY:g}, "
                f"{MAX_REPETITION_PENALTY:g}], got {quote(self.repetition_penalty)}; use 1.0 to turn it off"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise InvalidParameterError(
                f"seed (--seed) must be None or an integer in [0, 2**64 - 1], got {quote(self.seed)}"
            )
        # Frozen: normalize through object.__setattr__, once, here.
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidParameterError(
                f"stop must be a list of non-empty strings (--stop), got {quote(self.stop)}; an empty string "
                "would stop at once"
            )
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(
                f"stop (--stop) holds {len(stop)} strings, more than the {MAX_STOP_STRINGS} allowed; "
                "keep the ones that matter"
            )
        longest = max(stop, key=len, default="")
        if len(longest) > MAX_STOP_LENGTH:
            raise InvalidParameterError(
                f"stop (--stop) string {quote(longest)} is longer than the {MAX_STOP_LENGTH} characters allowed; "
                "use a shorter one"
            )
        object.__setattr__(self, "stop", list(stop))
        if not isinstance(self.stop_token_ids, Sequence) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise InvalidParameterError(
                f"stop_token_ids must be a list of token ids (integers >= 0), got {quote(self.stop_token_ids)}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParameterError(
                f"stop_token_ids holds {len(self.stop_token_ids)} ids, more than the {MAX_STOP_TOKEN_IDS} allowed"
            )
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameterError(f"ignore_eos must be True or False, got {quote(self.ignore_eos)}")

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token count is a mistake, not a request.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
