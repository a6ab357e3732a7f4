"""Key/value cache for the reference path: one contiguous buffer per layer, all rows the same length.

The model writes each step's keys and values through `update` and reads back the whole prefix.
This is the simple cache of the single-sequence generator; a paged cache for the batching engine
is a different object with the same `update`/`advance` interface. It holds no scheduling policy.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ContextLengthError


class KVCache:
    """Per-layer K and V buffers of shape [B, H_kv, max_seq_len, D], filled from position 0.

    Invariant: positions `[0, seq_len)` of every layer hold valid keys and values.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        self.seq_len = 0

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Allocate an empty cache for `batch_size` rows of up to `max_seq_len` positions.

        Raises:
            ContextLengthError: `max_seq_len` exceeds the model's context.
        """
        max_seq_len = max_seq_len or config.max_position_embeddings
        if max_seq_len > config.max_position_embeddings:
            raise ContextLengthError(
                f"a cache of {max_seq_len} positions exceeds the model's context of "
                f"{config.max_position_embeddings}; ask for fewer tokens"
            )
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        return cls(keys, values)

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `k`, `v` ([B, H_kv, T, D]) after the prefix; return the whole [B, H_kv, S+T, D]."""
        end = self.seq_len + k.shape[2]
        if end > self.max_seq_len:
            raise ContextLengthError(
                f"sequence of {end} tokens exceeds the cache's {self.max_seq_len} positions; "
                "shorten the prompt or lower max_new_tokens"
            )
        self.keys[layer][:, :, self.seq_len : end] = k
        self.values[layer][:, :, self.seq_len : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions valid, once every layer has written them."""
        self.seq_len += n

    def reset(self) -> None:
        self.seq_len = 0
