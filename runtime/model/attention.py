"""Causal scaled-dot-product attention over one row's queries and its whole prefix, shared by the caches.

Both caches (`kv_cache.KVCache`, the reference's contiguous one, and `paged_cache.PagedKVCache`,
the engine's) own attention: each gathers a row's keys and values its own way and hands them
here. This file holds the math only: no cache, no positions, no batching policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA: repeat each of the H_kv heads of `x` [B, H_kv, S, D] `n_rep` times -> [B, H_kv*n_rep, S, D]."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """Attention of queries at positions `offset .. offset+T-1` over keys at `0 .. offset+T-1`.

    Args:
        q: queries [B, H, T, D].
        k, v: keys and values [B, H_kv, offset+T, D] (H a multiple of H_kv).

    Returns:
        [B, H, T, D].
    """
    T = q.shape[2]
    if T == 1:
        return _one_query_attention(q, k, v, None)  # one query sees the whole prefix
    k, v = expand_kv(k, q.shape[1] // k.shape[1]), expand_kv(v, q.shape[1] // v.shape[1])
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Query i sits at position offset+i and sees keys 0..offset+i.
    q_pos = torch.arange(offset, offset + T, device=q.device)[:, None]
    k_pos = torch.arange(offset + T, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention where `mask` [B, 1, T, S] (True = attend) says which keys each query sees.

    Args:
        q: queries [B, H, T, D].
        k, v: keys and values [B, H_kv, S, D].

    Returns:
        [B, H, T, D].
    """
    if q.shape[2] == 1:
        return _one_query_attention(q, k, v, mask)
    k, v = expand_kv(k, q.shape[1] // k.shape[1]), expand_kv(v, q.shape[1] // v.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row (decode) without repeating K and V for GQA: the n_rep query
    heads that share a KV head are that head's n_rep queries, which is the same math.

    Args:
        q: [B, H, 1, D]; k, v: [B, H_kv, S, D]; mask: [B, 1, 1, S] (True = attend) or None.

    Returns:
        [B, H, 1, D].
    """
    B, H, _, D = q.shape
    H_kv = k.shape[1]
    grouped = q.reshape(B, H_kv, H // H_kv, D)  # head h -> KV head h // n_rep, as `expand_kv`
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)  # [B, H_kv, n_rep, D]
    return out.reshape(B, H, 1, D)
