"""Triton dequantization: a packed weight to its float matrix, and the tile decoder the matmul shares.

`_decode_tile` decodes a [BLOCK_N, BLOCK_K] tile of W from either in-memory layout (see
`kernels/reference.py`): compressed-tensors packed int4/int8 (offset-binary words along K, group
scales, optional zero points) or bitsandbytes NF4 (two codes a byte over the flattened matrix,
the even element in the high nibble, float32 block absmax). It reads rows along K, as they lie
in memory (coalesced), unpacks in registers, and applies scales a group at a time. Its float32
result rounded once to the weight's dtype equals the reference's bits. The launchers `dequant_packed_int`
and `dequant_nf4` have their references' names and signatures; today the runtime's quantized
modules expose them as `.dequantize()` and the tests call them. (A QLoRA backward,
grad_input = grad_out @ dequant(W), is planned to use them; `train/` holds no training yet.)
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


# How a tile finds its scales (constexpr SCALES): one per row (per-channel int8), one per GROUP
# consecutive weights of a row with GROUP a power of two (int4 groups, NF4 blocks when rows hold
# whole blocks: broadcast from a [rows, groups] load), or any other grouping (one load a weight).
PER_ROW, POW2_GROUPS, ANY_GROUPS = 0, 1, 2
# 2^23 as a float: OR-ing a small integer u into its mantissa gives the float 2^23 + u exactly, two
# full-rate instructions instead of a slow int-to-float conversion.
_MAGIC_BITS, _MAGIC = tl.constexpr(0x4B000000), tl.constexpr(8388608.0)


@triton.jit
def _decode_tile(
    w_ptr, scale_ptr, zero_ptr, code_ptr, offs_n, k0, n_mask,
    K, group_size, stride_wn, stride_sn, stride_sg,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SCALES: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W[offs_n, k0:k0 + BLOCK_K] as float32 [BLOCK_N, BLOCK_K], unrounded; columns past K are finite junk.

    Rows are read along K, as they lie in memory: packed int as [BLOCK_N, BLOCK_K / per_word]
    words, NF4 (rows holding whole bytes) as [BLOCK_N, BLOCK_K / 2] bytes, unpacked in registers.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if FORMAT == 0:
        # Packed int: element k of row n sits in word k // per_word at bit NUM_BITS * (k % per_word).
        per_word: tl.constexpr = 32 // NUM_BITS
        # Each word loaded once (one load a weight measured 3.7x to 6x slower on an H200), its
        # fields spread by a reshape.
        offs_w = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
        words = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
            mask=n_mask[:, None] & (offs_w < tl.cdiv(K, per_word))[None, :], other=0,
        )  # [BLOCK_N, BLOCK_K / per_word]
        shifts = tl.arange(0, per_word) * NUM_BITS
        fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << NUM_BITS) - 1)
        u = tl.reshape(fields, (BLOCK_N, BLOCK_K))  # stored value, offset binary
        # 2^23 + u, minus 2^23 and the offset: the signed value, exactly.
        w = (u | _MAGIC_BITS).to(tl.float32, bitcast=True) - (_MAGIC + (1 << (NUM_BITS - 1)))
    else:
        # NF4: flattened index e = n * K + k; byte e // 2, the even element in the high nibble.
        if EVEN_K:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(
                w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                mask=n_mask[:, None] & (offs_b < K // 2)[None, :], other=0,
            ).to(tl.int32)  # [BLOCK_N, BLOCK_K / 2]
            nibbles = (byte[:, :, None] >> (4 - 4 * tl.arange(0, 2))[None, None, :]) & 0xF
            code = tl.reshape(nibbles, (BLOCK_N, BLOCK_K))
        else:  # rows start mid-byte: one load a weight
            e = offs_n[:, None] * K + offs_k[None, :]
            byte = tl.load(w_ptr + e // 2, mask=n_mask[:, None] & (offs_k < K)[None, :], other=0).to(tl.int32)
            code = (byte >> ((1 - e % 2) * 4)) & 0xF
        w = tl.load(code_ptr + code)
    if SCALES == 0:
        scale = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            zero = tl.load(zero_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.float32)[:, None]
            w = w - zero
        w = w * scale
    elif SCALES == 1:
        if GROUP >= BLOCK_K:  # the whole tile in one group
            g = k0 // GROUP
            scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
                w = w - zero[:, None]
            w = w * scale[:, None]
        else:
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            g_mask = n_mask[:, None] & (offs_g < tl.cdiv(K, GROUP))[None, :]
            scale = tl.load(scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :] * stride_sg, mask=g_mask, other=0.0)
            w3 = tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP, GROUP))
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n[:, None] * stride_sn + offs_g[None, :] * stride_sg, mask=g_mask, other=0)
                w3 = w3 - zero.to(tl.float32)[:, :, None]
            w = tl.reshape(w3 * scale.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        if FORMAT == 0:
            s_offs = offs_n[:, None] * stride_sn + (offs_k // group_size)[None, :] * stride_sg
        else:  # NF4 blocks over the flattened matrix
            s_offs = (offs_n[:, None] * K + offs_k[None, :]) // group_size
        scale = tl.load(scale_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            w = w - tl.load(zero_ptr + s_offs, mask=mask, other=0).to(tl.float32)
        w = w * scale
    return w


def scale_layout(fmt: int, N: int, K: int, group_size: int, scale: torch.Tensor) -> tuple[int, int, int, int]:
    """(SCALES mode, GROUP, row stride, group stride) of a weight's scales, for `_decode_tile`."""
    if fmt == PACKED_INT:
        stride_sn, stride_sg = scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0
        if group_size >= K:
            return PER_ROW, 1, stride_sn, stride_sg
    else:  # NF4 absmax is flat: rows holding whole blocks see it as [N, K / blocksize]
        if K % group_size:
            return ANY_GROUPS, 1, 0, 0
        stride_sn, stride_sg = K // group_size, 1
    if group_size >= 16 and group_size & (group_size - 1) == 0:
        return POW2_GROUPS, group_size, stride_sn, stride_sg
    return ANY_GROUPS, 1, stride_sn, stride_sg


@triton.jit
def _dequant_kernel(
    w_ptr, scale_ptr, zero_ptr, code_ptr, out_ptr,
    N, K, group_size,
    stride_wn, stride_sn, stride_sg, stride_on,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SCALES: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, W_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w = _decode_tile(
        w_ptr, scale_ptr, zero_ptr, code_ptr, offs_n, k0, n_mask,
        K, group_size, stride_wn, stride_sn, stride_sg,
        FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, SCALES=SCALES, GROUP=GROUP, EVEN_K=EVEN_K,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    # (q - z) * s is exact in fp32 (a small integer times the scale), so one rounding to the
    # scale's dtype gives the bits the reference computes in that dtype.
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], cast(w, W_DTYPE, EXACT_BF16),
        mask=n_mask[:, None] & (offs_k < K)[None, :],
    )


def _launch(weight, scale, zero, code, *, fmt, num_bits, group_size, N, K, dtype) -> torch.Tensor:
    out = torch.empty(N, K, dtype=dtype, device=weight.device)  # [N, K]
    BLOCK_N, BLOCK_K = 16, 256
    scales, group, stride_sn, stride_sg = scale_layout(fmt, N, K, group_size, scale)
    _dequant_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))](
        weight, scale, zero if zero is not None else scale, code if code is not None else scale, out,
        N, K, group_size,
        weight.stride(0) if weight.dim() > 1 else 0, stride_sn, stride_sg, out.stride(0),
        FORMAT=fmt, NUM_BITS=num_bits, HAS_ZERO=zero is not None, SCALES=scales, GROUP=group, EVEN_K=K % 2 == 0,
        W_DTYPE=TL_DTYPES[dtype], EXACT_BF16=interpreting(), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
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
