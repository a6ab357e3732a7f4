"""Triton dequantization: a packed weight to its float matrix, and the tile decoder the matmul shares.

`_dequant_tile` decodes a [BLOCK_K, BLOCK_N] tile of W.T from either in-memory layout (see
`kernels/reference.py`): compressed-tensors packed int4/int8 (offset-binary words along K, group
scales, optional zero points) or bitsandbytes NF4 (two codes a byte over the flattened matrix,
the even element in the high nibble, float32 block absmax). It rounds exactly as the reference
does, so a decoded weight equals the reference's bit for bit. The launchers `dequant_packed_int`
and `dequant_nf4` have their references' names and signatures; training's backward uses them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import nf4_code
from .triton_utils import cast, interpreting

PACKED_INT, NF4 = 0, 1
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@functools.cache
def code_table(device: torch.device) -> torch.Tensor:
    """The NF4 code book on `device`, made once per device (not a host-to-device copy per call)."""
    return nf4_code(device)


@triton.jit
def _dequant_tile(
    w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, mask,
    K, group_size, stride_wn, stride_wk, stride_sn, stride_sg,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, W_DTYPE: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    if FORMAT == 0:
        # Packed int: element k of row n sits in word k // per_word at bit NUM_BITS * (k % per_word).
        per_word: tl.constexpr = 32 // NUM_BITS
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // per_word)[:, None] * stride_wk, mask=mask, other=0)
        shifts = ((offs_k % per_word) * NUM_BITS)[:, None]
        q = ((words >> shifts) & ((1 << NUM_BITS) - 1)) - (1 << (NUM_BITS - 1))
        group = (offs_k // group_size)[:, None]
        scale = tl.load(scale_ptr + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0.0)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0)
            q = q - zero.to(tl.int32)
        # (q - z) * s is exact in fp32 (a small integer times the scale), so one rounding to the
        # scale's dtype gives the bits the reference computes in that dtype.
        w = cast(q.to(tl.float32) * scale.to(tl.float32), W_DTYPE, EXACT_BF16)
    else:
        # NF4: flattened index e = n * K + k; byte e // 2, the even element in the high nibble.
        e = offs_n[None, :] * K + offs_k[:, None]
        byte = tl.load(w_ptr + e // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - e % 2) * 4)) & 0xF
        value = tl.load(code_ptr + code)
        absmax = tl.load(scale_ptr + e // group_size, mask=mask, other=0.0)
        w = cast(value * absmax, W_DTYPE, EXACT_BF16)
    return w


@triton.jit
def _dequant_kernel(
    w_ptr, scale_ptr, zero_ptr, code_ptr, out_ptr,
    N, K, group_size,
    stride_wn, stride_wk, stride_sn, stride_sg, stride_on, stride_ok,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, W_DTYPE: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    w = _dequant_tile(
        w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, mask,
        K, group_size, stride_wn, stride_wk, stride_sn, stride_sg,
        FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE, EXACT_BF16=EXACT_BF16,
    )  # [BLOCK_K, BLOCK_N] of W.T
    tl.store(out_ptr + offs_n[None, :] * stride_on + offs_k[:, None] * stride_ok, w, mask=mask)


def _launch(weight, scale, zero, code, *, fmt, num_bits, group_size, N, K, dtype) -> torch.Tensor:
    out = torch.empty(N, K, dtype=dtype, device=weight.device)  # [N, K]
    BLOCK_N, BLOCK_K = 32, 64
    _dequant_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))](
        weight, scale, zero if zero is not None else scale, code if code is not None else scale, out,
        N, K, group_size,
        weight.stride(0), weight.stride(1) if weight.dim() > 1 else 0,
        scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0,
        out.stride(0), out.stride(1),
        FORMAT=fmt, NUM_BITS=num_bits, HAS_ZERO=zero is not None, W_DTYPE=TL_DTYPES[dtype],
        EXACT_BF16=interpreting(), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def dequant_packed_int(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    *,
    num_bits: int,
    in_features: int,
) -> torch.Tensor:
    """W [N, K] in the scale's dtype from a compressed-tensors packed int4/int8 weight; see the reference."""
    N, G = weight_scale.shape
    return _launch(
        weight_packed, weight_scale, weight_zero_point, None, fmt=PACKED_INT, num_bits=num_bits,
        group_size=in_features // G, N=N, K=in_features, dtype=weight_scale.dtype,
    )


def dequant_nf4(
    weight_packed: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, K] in `dtype` from a bitsandbytes NF4 weight with float32 absmax; see the reference."""
    N, K = shape
    return _launch(
        weight_packed.reshape(-1), absmax, None, code_table(weight_packed.device), fmt=NF4, num_bits=4,
        group_size=blocksize, N=N, K=K, dtype=dtype,
    )
