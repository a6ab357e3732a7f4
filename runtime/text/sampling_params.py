"""What a request asks of sampling: `SamplingParams`, its limits and its defaults, without torch.

`SamplingParams` is the one description of a request's sampling settings and stop conditions for
every runtime: the torch processors (`sampling.py`), the engine, the server and the edge runtime
(`edge/sampling.py`, numpy) all take it. Its field defaults are the defaults everywhere:
`SAMPLING_DEFAULTS` lists them for the command-line flags and the wire format, which derive
theirs from it rather than restating them. Greedy decoding (temperature 0) is the default.

This file holds data and its checks only: it imports no torch or numpy and picks no token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ..errors import InvalidParameterError, quote

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
# The most top alternatives a request may ask logprobs for, as OpenAI's chat API and vLLM allow.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    Attributes:
        max_new_tokens: most tokens to sample, counting a final eos or stop token.
        temperature: divides the logits; 0 (the default) means greedy (argmax, top-k and top-p
            ignored), and so does any temperature below `GREEDY_TEMPERATURE` (1e-5).
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
        logprobs: report each output token's log-probability and this many most likely
            alternatives (0 to 20; 0 reports the token's alone); None (the default) computes none.
            They are of the model's raw distribution: the log-softmax of its logits, before the
            repetition penalty, temperature, top-k and top-p.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

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
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParameterError(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (how many top alternatives to report "
                f"beside each token's own), got {quote(self.logprobs)}"
            )

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token count is a mistake, not a request.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Every field's default, by name: what an unset flag or wire field means.
SAMPLING_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    for f in fields(SamplingParams)
}
