"""Triton multi-adapter LoRA: shrink (x @ A[s].T) and expand (+ @ B[s].T) with a slot per token.

Two schedules, both one shrink and one expand launch for a whole batch mixing adapters:

- up to `BGMV_MAX_TOKENS` tokens (decode): a per-token gather (Punica's BGMV): program m reads
  token m's slot from the per-token slot buffer and that slot's factors; no sort, no metadata
  beyond the slots themselves, so a CUDA graph replays it with the slots its buffer holds;
- more tokens (prefill): tokens grouped by slot (vLLM's sort-by-slot metadata, made once per
  slots tensor, i.e. once per forward pass, not once per layer), each program on one slot's tokens.

The expand adds into the base output in place (`add_lora_`). A stacked base (q/k/v in one
module) has one stack whose A holds every section's factors, so its sections take one launch each
way. Nothing waits on the device (no host sync), so a call only queues work.
Slot buffers are the `LoRALinear` stacks: A [S, R, in] and B [S, out, R] with the scale folded
into B. Loading an adapter is a copy into a slot; nothing here depends on which adapter is where,
so swapping one recompiles nothing. `kernels.reference.add_lora` is the torch version of `add_lora`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import NO_SLOT
from .triton_utils import cast, interpreting


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    token_ptr, slot_ptr, start_ptr, count_ptr,
    K, R,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (group g, token block m): out[tok, :] = x[tok, :] @ A[slot_g].T for its tokens.
    group, pid_m = tl.program_id(0), tl.program_id(1)
    count = tl.load(count_ptr + group)
    if pid_m * BLOCK_M >= count:
        return
    slot = tl.load(slot_ptr + group)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(token_ptr + tl.load(start_ptr + group) + offs_m, mask=m_mask, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        a = tl.load(  # A[slot] read transposed: [BLOCK_K, BLOCK_R]
            a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=k_mask[:, None] & r_mask[None, :], other=0.0,
        )
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, a, input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    tl.store(
        out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
        mask=m_mask[:, None] & r_mask[None, :],
    )


@triton.jit
def _lora_expand_kernel(
    s_ptr, b_ptr, y_ptr,
    token_ptr, slot_ptr, start_ptr, count_ptr,
    N, R,
    stride_sm, stride_sr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    # Program (group g, token block m, column block n): y[tok, n] += s[tok, :] @ B[slot_g][n, :].T
    group, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(count_ptr + group)
    if pid_m * BLOCK_M >= count:
        return
    slot = tl.load(slot_ptr + group)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(token_ptr + tl.load(start_ptr + group) + offs_m, mask=m_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    s = tl.load(
        s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=m_mask[:, None] & r_mask[None, :], other=0.0,
    )
    b = tl.load(  # B[slot] read transposed: [BLOCK_R, BLOCK_N]
        b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=r_mask[:, None] & n_mask[None, :], other=0.0,
    ).to(tl.float32)
    if IEEE:
        delta = tl.dot(s, b, input_precision="ieee")
    else:
        delta = tl.dot(s, b)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, cast(y + delta, y_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


BGMV_MAX_TOKENS = 128


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, slots_ptr, out_ptr, K, R,
    stride_xm, stride_as, stride_ar, stride_ak, stride_om,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program m: out[m, :R] = x[m] @ A[slot_m].T in float32; a token without a slot is skipped.
    m = tl.program_id(0)
    slot = tl.load(slots_ptr + m)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(out_ptr + m * stride_om + offs_r, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    s_ptr, b_ptr, slots_ptr, y_ptr, N, R,
    stride_sm, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    # Program (m, column block n): y[m, n] += s[m, :R] @ B[slot_m][n, :].T, in place.
    m, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + m)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s = tl.load(s_ptr + m * stride_sm + offs_r, mask=r_mask, other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
    y_ptrs = y_ptr + m * stride_ym + offs_n * stride_yn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32) + tl.sum(b * s[None, :], axis=1)
    tl.store(y_ptrs, cast(y, y_ptr.dtype.element_ty, EXACT_BF16), mask=n_mask)


def slot_groups(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token rows by slot without a device-to-host sync (the grid does not depend on the data).

    Returns:
        (tokens, starts, counts): `tokens` [M] lists every row sorted by slot (rows with
        `NO_SLOT` first); slot s's rows are `tokens[starts[s] : starts[s] + counts[s]]`.
    """
    tokens = torch.argsort(token_slots, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=token_slots.device)
    index = token_slots.long() + 1  # [none, slot 0, slot 1, ...]
    counts.scatter_add_(0, index, torch.ones_like(index))
    starts = torch.cumsum(counts, 0) - counts
    return tokens.to(torch.int32), starts[1:].to(torch.int32), counts[1:].to(torch.int32)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """y + (x @ A[s].T) @ B[s].T for each row, s its slot (-1 adds nothing): `add_lora_` on a copy of y."""
    if isinstance(token_slots, int) and token_slots == NO_SLOT:
        return y
    return add_lora_(y.clone(), x, lora_a, lora_b, token_slots)


# The slot groups made for the last slots tensor (the prefill schedule): every LoRA layer of one
# forward pass gets the same slots tensor object from the model's SlotMapping, so they are made
# once per pass. The cache holds that object, so its id cannot be reused.
_groups_of: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def add_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """y += (x @ A[s].T) @ B[s].T for each row in place, s its slot (-1 adds nothing); returns y.

    Args:
        y: base output [M, out].
        x: input [M, in], in the slot buffers' dtype.
        lora_a: A stack [S, R, in].
        lora_b: B stack [S, out, R], scales folded in.
        token_slots: one slot for every row, or an int64 tensor [M].

    Returns:
        `y`, updated in place.
    """
    global _groups_of
    M, K = x.shape
    S, R, K_a = lora_a.shape
    N = lora_b.shape[1]
    assert K == K_a and y.shape == (M, N) and lora_b.shape == (S, N, R), "LoRA shapes disagree"
    if isinstance(token_slots, int):
        if token_slots == NO_SLOT:
            return y
        token_slots = torch.full((M,), token_slots, dtype=torch.int64, device=x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    BLOCK_R = max(16, triton.next_power_of_2(R))
    shrunk = torch.empty(M, R, dtype=torch.float32, device=x.device)  # [M, R]; rows without a slot unused
    if M <= BGMV_MAX_TOKENS:
        _bgmv_shrink_kernel[(M,)](
            x, lora_a, token_slots, shrunk, K, R,
            x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), shrunk.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_K=min(256, triton.next_power_of_2(K)),  # one program a token: wide K steps
        )
        BLOCK_N = 64
        _bgmv_expand_kernel[(M, triton.cdiv(N, BLOCK_N))](
            shrunk, lora_b, token_slots, y, N, R,
            shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
            BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, EXACT_BF16=interpreting(),
        )
        return y
    if _groups_of is None or _groups_of[0] is not token_slots or _groups_of[1] != S:
        _groups_of = (token_slots, S, slot_groups(token_slots, S))
    tokens, starts, counts = _groups_of[2]
    slots = torch.arange(S, dtype=torch.int32, device=x.device)
    out = y
    BLOCK_M = 16
    grid_m = triton.cdiv(M, BLOCK_M)  # programs past their slot's rows return at once
    ieee = x.dtype == torch.float32  # fp32 inputs keep fp32 products (no TF32) to match the reference
    upcast = interpreting()
    _lora_shrink_kernel[(slots.numel(), grid_m)](
        x, lora_a, shrunk, tokens, slots, starts, counts, K, R,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        shrunk.stride(0), shrunk.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=64, IEEE=ieee or upcast, UPCAST=upcast,
    )
    BLOCK_N = 64
    _lora_expand_kernel[(slots.numel(), grid_m, triton.cdiv(N, BLOCK_N))](
        shrunk, lora_b, out, tokens, slots, starts, counts, N, R,
        shrunk.stride(0), shrunk.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, IEEE=True, EXACT_BF16=interpreting(),
    )
    return out
