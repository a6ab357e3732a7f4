"""Key/value cache for the reference path: one contiguous buffer per layer, all rows the same length.

Attention calls `attend`, which writes a step's keys and values after the prefix and attends
over the whole of it; the model calls `advance` once every layer has. This is the simple cache of
the single-sequence reference generator; the engine's is `paged_cache.PagedKVCache`, with the same
`attend`. It holds no scheduling policy.
"""

from __future__ import annotations

import torch

from .attention import causal_attention
from .config import ModelConfig
from ..errors import ContextLengthError


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: object = None) -> torch.Tensor:
        """Store `k`, `v` [B, H_kv, T, D] after the prefix and attend `q` [B, H, T, D] over it.

        Returns:
            [B, T, H*D].
        """
        assert batch is None, "the contiguous cache serves rows of equal length; use PagedKVCache for a ForwardBatch"
        offset = self.seq_len
        k, v = self.update(layer, k, v)  # [B, H_kv, offset+T, D]
        B, H, T, D = q.shape
        return causal_attention(q, k, v, offset).transpose(1, 2).reshape(B, T, H * D)

    def advance(self, n: int) -> None:
        """Mark `n` more positions valid, once every layer has written them."""
        self.seq_len += n

    def reset(self) -> None:
        self.seq_len = 0
