"""runtime/model/attention.py against SDPA over K and V repeated for GQA (the textbook form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quadapt.runtime.model.attention import causal_attention, expand_kv, masked_attention

from .conftest import assert_close


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (6, 1)])
def test_one_query_attention_equals_repeated_kv(heads, kv_heads):
    """Decode rows (one query each) attend without repeating K and V; the math is unchanged."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    B, S, D = 3, 13, 16
    q = torch.randn(B, heads, 1, D, generator=g)
    k, v = torch.randn(B, kv_heads, S, D, generator=g), torch.randn(B, kv_heads, S, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[..., 0] = True
    n_rep = heads // kv_heads
    k_rep, v_rep = expand_kv(k, n_rep), expand_kv(v, n_rep)
    assert_close(masked_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask))
    assert_close(causal_attention(q, k, v, offset=S - 1), F.scaled_dot_product_attention(q, k_rep, v_rep))
    # Negative control: a head grouped with the wrong KV head gives another answer.
    if kv_heads > 1:
        wrong = F.scaled_dot_product_attention(q, k_rep.roll(1, dims=1), v_rep.roll(1, dims=1), attn_mask=mask)
        assert not torch.allclose(masked_attention(q, k, v, mask), wrong, atol=1e-3)


def test_many_queries_keep_the_causal_offset():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k, v = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    mask = torch.arange(7)[None, :] <= torch.arange(4, 7)[:, None]  # query i at position 4+i
    expected = F.scaled_dot_product_attention(q, expand_kv(k, 2), expand_kv(v, 2), attn_mask=mask)
    assert_close(causal_attention(q, k, v, offset=4), expected)
