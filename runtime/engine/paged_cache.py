"""The engine's key/value cache: fixed-size blocks shared by all requests, a block table per request.

Memory is `num_blocks` blocks of `block_size` positions per layer, allocated once (sized from a
memory budget by `blocks_for_budget`). `BlockAllocator` hands blocks out and takes them back;
it knows nothing of requests beyond the block ids it gave. `PagedKVCache.attend` writes a
batch's new keys and values into their slots and attends each row over its own blocks, as
`ForwardBatch` describes them (see `batch.py`).

This file holds no scheduling policy: who gets blocks, and who is preempted when they run out,
is the scheduler's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.attention import causal_attention, masked_attention
from ..model.batch import ForwardBatch
from ..model.config import ModelConfig
from ..errors import InvalidParameterError


class BlockAllocator:
    """A free list of `num_blocks` block ids.

    Invariant: every id is either free or held by exactly one caller; `num_used` counts the held.
    `on_free`, if given, hears of every block given back (an executor that keeps its own KV
    per request frees it there).
    """

    def __init__(self, num_blocks: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        if num_blocks < 1:
            raise InvalidParameterError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: low ids first
        self._held: set[int] = set()
        self._on_free = on_free

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks; the caller checks `num_free` first."""
        assert 0 <= n <= len(self._free), (n, len(self._free))
        blocks = [self._free.pop() for _ in range(n)]
        self._held.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give blocks back."""
        for block in blocks:
            assert block in self._held, f"block {block} freed twice or never allocated"
            self._held.remove(block)
            self._free.append(block)
        if self._on_free is not None:
            self._on_free(blocks)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


def blocks_for_budget(config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `budget_bytes`.

    Raises:
        InvalidParameterError: the budget holds less than one block.
    """
    per_block = bytes_per_block(config, block_size, dtype)
    n = budget_bytes // per_block
    if n < 1:
        raise InvalidParameterError(
            f"a KV cache budget of {budget_bytes} bytes holds no block of {block_size} positions "
            f"({per_block} bytes each for this model); raise the budget"
        )
    return int(n)


class PagedKVCache:
    """Per-layer K and V storage [num_blocks, block_size, H_kv, D], and attention over it."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1:
            raise InvalidParameterError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch | None
    ) -> torch.Tensor:
        """Store the batch's new keys and values, then attend each row over its prefix.

        Args:
            layer: the layer index.
            q: queries [1, H, N, D] of the batch's N tokens, end to end.
            k, v: their keys and values [1, H_kv, N, D].
            batch: the batch description; required.

        Returns:
            [1, N, H*D].
        """
        assert batch is not None, "the paged cache needs a ForwardBatch"
        _, H, N, D = q.shape
        H_kv = k.shape[1]
        k_store, v_store = self.keys[layer], self.values[layer]
        # [1, H_kv, N, D] -> [N, H_kv, D], written at each token's slot.
        k_store.view(-1, H_kv, D).index_copy_(0, batch.slot_mapping, k[0].transpose(0, 1))
        v_store.view(-1, H_kv, D).index_copy_(0, batch.slot_mapping, v[0].transpose(0, 1))
        q_tokens = q[0].transpose(0, 1)  # [N, H, D]
        if batch.decode is not None:
            rows = batch.decode
            R = rows.token_index.shape[0]
            # [R * blocks, B, H_kv, D] -> [R, H_kv, S, D]; index_select, not advanced indexing,
            # which costs far more on CPU for the same copy.
            table = rows.block_tables.reshape(-1)
            keys = k_store.index_select(0, table).view(R, -1, H_kv, D).transpose(1, 2)
            values = v_store.index_select(0, table).view(R, -1, H_kv, D).transpose(1, 2)
            if not batch.prefill:  # every token is a decode row's, in order: no gather, no scatter
                return masked_attention(q_tokens.unsqueeze(2), keys, values, rows.mask).reshape(1, N, H * D)
            out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
            queries = q_tokens[rows.token_index].unsqueeze(2)  # [R, H, 1, D]
            out[rows.token_index] = masked_attention(queries, keys, values, rows.mask)[:, :, 0]
        else:
            out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
        for row in batch.prefill:
            # [blocks, B, H_kv, D] -> [1, H_kv, context, D]
            keys = k_store.index_select(0, row.blocks).view(-1, H_kv, D)[: row.context].transpose(0, 1)[None]
            values = v_store.index_select(0, row.blocks).view(-1, H_kv, D)[: row.context].transpose(0, 1)[None]
            queries = q_tokens[row.first : row.first + row.length].transpose(0, 1)[None]  # [1, H, T, D]
            result = causal_attention(queries, keys, values, offset=row.context - row.length)
            out[row.first : row.first + row.length] = result[0].transpose(0, 1)
        return out.reshape(1, N, H * D)
