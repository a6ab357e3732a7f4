"""CPU implementations of the ops where a torch formulation beats the reference's: `add_lora`, `lora_linear`.

The reference `add_lora` loops over the slots present in a batch, gathering each slot's rows;
on a CPU each of those small ops pays a parallel region's start and end. Here every slot's LoRA
runs in two dense matmuls over the whole stack, and a per-token mask keeps each token's own
slot: y + ((x @ A_all.T) * mask) @ B_all.T, where A_all is [S*R, in], B_all [out, S*R], and
mask[m] is 1 on the R columns of token m's slot and 0 elsewhere (a token with `NO_SLOT` gets
all zeros). The zeros are exact, so the sum is the token's own slot's LoRA; only the order of
floating-point additions differs from the reference. `LoRALinear` stores B as [out, S, R] so
that B_all is a view, not a copy. Same name and signature as `kernels.reference.add_lora`.

`lora_linear` takes the base weight and every slot's A stored as one matrix [out + S*R, in]
(`LoRALinear.fuse_shrink`): one GEMM gives both the base output and every slot's shrink. On a
small batch each matmul pays a parallel region's start and end, and this saves one per projection.
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .reference import NO_SLOT


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """y + (x @ A[s].T) @ B[s].T for each row, s its slot (-1 adds nothing); see the module docstring.

    Args:
        y: base output [M, out].
        x: input [M, in], in the slot buffers' dtype.
        lora_a: A stack [S, R, in].
        lora_b: B stack [S, out, R], scales already folded in.
        token_slots: one slot for every row (an int), or an int64 tensor [M].

    Returns:
        A new tensor [M, out]; `y` is not modified.
    """
    if isinstance(token_slots, int):
        return reference.add_lora(y, x, lora_a, lora_b, token_slots)
    S, R, K = lora_a.shape
    return expand_lora(y, torch.nn.functional.linear(x, lora_a.reshape(S * R, K)), lora_b, token_slots)


def lora_linear(
    x: torch.Tensor,
    weight_and_a: torch.Tensor,
    bias: torch.Tensor | None,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """x @ W.T + bias plus each row's LoRA, W stored above every slot's A; see the module docstring
    and `kernels.reference.lora_linear` (same signature).

    Returns:
        A new tensor [M, out].
    """
    S, N, R = lora_b.shape
    if isinstance(token_slots, int):  # one slot for every row: its A alone, not the whole stack
        y = torch.nn.functional.linear(x, weight_and_a[:N], bias)
        if token_slots == NO_SLOT:
            return y
        a = weight_and_a[N + token_slots * R: N + (token_slots + 1) * R]  # [R, in]
        return torch.addmm(y, x @ a.T, lora_b[token_slots].T)
    full = torch.nn.functional.linear(x, weight_and_a)  # [M, out + S*R]: base output, then every shrink
    y = full[:, :N]
    if bias is not None:
        y = y + bias
    return expand_lora(y, full[:, N:], lora_b, token_slots)


def expand_lora(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """y + (shrunk * mask) @ B_all.T: the second half of `add_lora`, for a caller that computed
    shrunk = x @ A_all.T itself (in the same GEMM as the base output, say).

    Args:
        y: base output [M, out].
        shrunk: x @ A_all.T [M, S*R] for every slot, in the slot buffers' dtype.
        lora_b: B stack [S, out, R], scales already folded in.
        token_slots: an int64 tensor [M], one slot per row.

    Returns:
        A new tensor [M, out]; `y` is not modified.
    """
    S, N, R = lora_b.shape
    masked = shrunk * _token_mask(token_slots, S, R, shrunk.dtype)  # [M, S*R]
    b_all = lora_b.permute(1, 0, 2).reshape(N, S * R)  # [out, S*R]
    if y.dtype != shrunk.dtype:
        return y + masked @ b_all.T  # the reference's type promotion
    return torch.addmm(y, masked, b_all.T)


# The masks made for the last slots tensor, by (slots, rank, dtype). Every LoRA layer of one
# forward pass gets the same slots tensor object from the model's SlotMapping, so each mask is made
# once per pass, not once per layer (stacks of different ranks share the pass). The cache holds that
# object, so its id cannot be reused; a slots tensor must not be changed in place once passed
# (SlotMapping makes a new one every pass).
_masks_of: tuple[torch.Tensor, dict[tuple[int, int, torch.dtype], torch.Tensor]] | None = None


def _token_mask(token_slots: torch.Tensor, num_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[M, S*R]: for each token, ones on its slot's R columns (all zeros for `NO_SLOT`)."""
    global _masks_of
    if _masks_of is None or _masks_of[0] is not token_slots:
        _masks_of = (token_slots, {})
    masks = _masks_of[1]
    key = (num_slots, rank, dtype)
    if key not in masks:
        masks[key] = _slot_masks(num_slots, rank, dtype, token_slots.device).index_select(0, token_slots + 1)
    return masks[key]


@functools.cache
def _slot_masks(num_slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[S+1, S*R]: row 0 all zeros (`NO_SLOT`), row s+1 ones on slot s's R columns."""
    eye = torch.eye(num_slots + 1, dtype=dtype, device=device)[:, 1:]  # [S+1, S]
    return eye.repeat_interleave(rank, dim=1)
