"""Triton decoding of the kernels' layout (`kernels/layout.py`): the tile decoder the matmuls share,
and `dequant_weight`, which writes W.T [K, N] into a scratch buffer for the many-row path.

`_decode_kt_tile` decodes a [BLOCK_K, BLOCK_N] tile of W.T: for every K row of the tile it reads
the word holding that row's fields across BLOCK_N adjacent columns (coalesced; a word serves
`per_word` consecutive K rows, which hit the cache), shifts by the row's own amount and masks,
so no register reshape moves data between threads. Scales and zero points come one [G, N] row
per K row the same way. The result is W in float32 rounded to the weight's dtype once, the bits
the reference computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import TL_DTYPES, code_table
from .layout import KernelWeight
from .triton_utils import cast, interpreting

# 2^23 as a float: OR-ing a small integer u into its mantissa gives the float 2^23 + u exactly.
_MAGIC_BITS, _MAGIC = tl.constexpr(0x4B000000), tl.constexpr(8388608.0)


@triton.jit
def _decode_kt_tile(
    w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, k_mask, n_mask, N,
    GROUP: tl.constexpr, FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    W_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """W.T[offs_k, offs_n] as float32 [BLOCK_K, BLOCK_N], rounded to W_DTYPE; masked entries are 0.

    GROUP is the weights of a column per scale, 0 for one scale per column (`group_arg`).
    """
    per_word: tl.constexpr = 32 // NUM_BITS
    mask = k_mask[:, None] & n_mask[None, :]
    words = tl.load(w_ptr + (offs_k // per_word)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    u = (words >> ((offs_k % per_word) * NUM_BITS)[:, None]) & ((1 << NUM_BITS) - 1)
    if GROUP == 0:  # one scale a column: one row of them
        g_offs = offs_n[None, :]
        g_mask = n_mask[None, :]
    else:
        g_offs = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        g_mask = mask
    scale = tl.load(scale_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
    if FORMAT == 0:  # offset binary: 2^23 + u, minus 2^23 and the offset, is the signed value exactly
        w = (u | _MAGIC_BITS).to(tl.float32, bitcast=True) - (_MAGIC + (1 << (NUM_BITS - 1)))
        if HAS_ZERO:
            w = w - tl.load(zero_ptr + g_offs, mask=g_mask, other=0).to(tl.float32)
    else:  # NF4: a code book index
        w = tl.load(code_ptr + u)
    # (q - z) * s of small integers and a 16-bit scale is exact in float32: one rounding, as the reference.
    return cast(w * scale, W_DTYPE, EXACT_BF16).to(tl.float32)


@triton.jit
def _dequant_kernel(
    w_ptr, scale_ptr, zero_ptr, code_ptr, out_ptr, N, K,
    GROUP: tl.constexpr, FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, W_DTYPE: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, n_mask = offs_k < K, offs_n < N
    w = _decode_kt_tile(
        w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, k_mask, n_mask, N,
        GROUP=GROUP, FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE, EXACT_BF16=EXACT_BF16,
    )
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], cast(w, out_ty, EXACT_BF16),
             mask=k_mask[:, None] & n_mask[None, :])


def kernel_args(weight: KernelWeight) -> tuple:
    """(words, scale, zero, code) pointers for a kernel: absent ones stand in as the scale."""
    code = code_table(weight.words.device) if weight.fmt == 1 else weight.scale
    return weight.words, weight.scale, weight.scale if weight.zero is None else weight.zero, code


def group_arg(weight: KernelWeight) -> int:
    """The kernels' GROUP: weights of a column per scale, 0 for one scale per column (no division by K)."""
    return 0 if weight.scale.shape[0] == 1 else weight.group_size


def dequant_weight(weight: KernelWeight, *, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in `weight.dtype`, as the reference; with `dtype` or `out`, W.T [K, N] in that dtype
    instead (rounded to `weight.dtype` first), written into `out` when given (a scratch buffer).

    Raises:
        AssertionError: `out` is not a contiguous [K, N] tensor.
    """
    N, K = weight.shape
    transposed = dtype is not None or out is not None
    if out is None:
        out = torch.empty(K, N, dtype=dtype or weight.dtype, device=weight.words.device)  # [K, N]
    assert out.shape == (K, N) and out.is_contiguous(), (out.shape, (K, N))
    BLOCK_K, BLOCK_N = 32, 64
    _dequant_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))](
        *kernel_args(weight), out, N, K,
        GROUP=group_arg(weight), FORMAT=weight.fmt, NUM_BITS=weight.num_bits, HAS_ZERO=weight.zero is not None,
        W_DTYPE=TL_DTYPES[weight.dtype], EXACT_BF16=interpreting(), BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
    )
    return out if transposed else out.t()
