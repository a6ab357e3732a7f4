"""The batched forward over the paged cache against the reference forward, row by row.

Rows at different positions, prefill chunks and decode tokens share one forward pass; each row's
logits must equal what the contiguous-cache forward gives that row alone.
"""

from __future__ import annotations

import pytest
import torch

from quadapt.runtime.model.batch import RowSpec, build_batch
from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.model.kv_cache import KVCache
from quadapt.runtime.model.model import CausalLM
from quadapt.runtime.engine.paged_cache import BlockAllocator, PagedKVCache, blocks_for_budget, bytes_per_block

from .conftest import assert_close, tiny_llama_config

BLOCK = 4


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_dict(tiny_llama_config())).eval().requires_grad_(False)


def reference_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of every position of `ids`, through the contiguous cache in two pieces."""
    cache = KVCache.allocate(model.config, max_seq_len=len(ids))
    half = max(1, len(ids) // 2)
    first = model(torch.tensor([ids[:half]]), cache)[0]
    if half == len(ids):
        return first
    second = model(torch.tensor([ids[half:]]), cache)[0]
    return torch.cat([first, second])


def test_mixed_rows_equal_each_row_alone(model):
    torch.manual_seed(1)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (9, 3, 14, 1, 6)]
    cache = PagedKVCache(model.config, num_blocks=64, block_size=BLOCK)
    allocator = BlockAllocator(64)
    tables = [allocator.allocate(-(-len(s) // BLOCK)) for s in seqs]
    # Step 1: rows prefill different prefixes (one whole, others in part), in one batch.
    done = [5, 2, 8, 1, 6]
    rows = [RowSpec(s[:d], 0, t, needs_logits=True) for s, d, t in zip(seqs, done, tables)]
    with torch.inference_mode():
        first = model(build_batch(rows, BLOCK).input_ids, cache, batch=build_batch(rows, BLOCK))
        # Step 2: the rest, mixing several-token chunks and single tokens, at different positions.
        rows = [RowSpec(s[d:], d, t, needs_logits=True) for s, d, t in zip(seqs, done, tables) if d < len(s)]
        batch = build_batch(rows, BLOCK)
        second = model(batch.input_ids, cache, batch=batch)
        expected = [reference_logits(model, s) for s in seqs]
    for i, (s, d) in enumerate(zip(seqs, done)):
        assert_close(first[i], expected[i][d - 1], msg=f"row {i} step 1")
    rest = [i for i, (s, d) in enumerate(zip(seqs, done)) if d < len(s)]
    for j, i in enumerate(rest):
        assert_close(second[j], expected[i][-1], msg=f"row {i} step 2")


def test_decode_rows_of_different_lengths(model):
    """Many one-token rows at different positions: the padded, masked attention path."""
    torch.manual_seed(2)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (2, 7, 12, 5)]
    cache = PagedKVCache(model.config, num_blocks=32, block_size=BLOCK)
    allocator = BlockAllocator(32)
    tables = [allocator.allocate(-(-len(s) // BLOCK)) for s in seqs]
    with torch.inference_mode():
        prefill = [RowSpec(s[:-1], 0, t, needs_logits=False) for s, t in zip(seqs, tables)]
        batch = build_batch(prefill, BLOCK)
        assert model(batch.input_ids, cache, batch=batch).shape[0] == 0
        decode = [RowSpec(s[-1:], len(s) - 1, t, needs_logits=True) for s, t in zip(seqs, tables)]
        batch = build_batch(decode, BLOCK)
        assert batch.decode is not None and not batch.prefill
        logits = model(batch.input_ids, cache, batch=batch)
    for i, s in enumerate(seqs):
        assert_close(logits[i], reference_logits(model, s)[-1], msg=f"row {i}")


def test_allocator_accounting():
    allocator = BlockAllocator(5)
    a = allocator.allocate(3)
    assert allocator.num_used == 3 and allocator.num_free == 2
    allocator.free(a)
    assert allocator.num_used == 0
    with pytest.raises(AssertionError):
        allocator.free(a[:1])  # an internal invariant: freeing twice is a bug, not a user error


def test_budget_sizes_the_cache(model):
    per_block = bytes_per_block(model.config, BLOCK, torch.float32)
    assert blocks_for_budget(model.config, 10 * per_block + 1, BLOCK, torch.float32) == 10
    with pytest.raises(InvalidParameterError, match="holds no block"):
        blocks_for_budget(model.config, per_block - 1, BLOCK, torch.float32)
