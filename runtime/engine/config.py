"""How the batching engine batches (`EngineConfig`), and its KV cache budget's default.

Apart from `engine.py` so that `args.py`, and the command line's `--help` through it,
read these defaults without importing torch. It holds data and checks only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidParameterError

DEFAULT_KV_CACHE_BYTES = 512 * 2**20  # the paged KV cache's memory unless told


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    Attributes:
        max_num_seqs: the most requests running at once.
        max_num_batched_tokens: the most tokens one step feeds (prompt chunks and decode tokens);
            a longer prompt is prefilled in chunks.
        max_loras: adapter slots (distinct adapters in one batch); 0 serves the base model only.
        max_lora_rank: the largest adapter rank a slot holds.
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_loras: int = 4
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_loras, int) or self.max_loras < 0:
            raise InvalidParameterError(f"max_loras must be an integer >= 0, got {self.max_loras!r}")
