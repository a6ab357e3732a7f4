"""Triton fused dequant-matmul: y = x @ dequant(W).T + bias, the weight never materialized in full.

One kernel serves every weight format: each program decodes a [BLOCK_K, BLOCK_N] weight tile in
registers with `dequant._dequant_tile` (compressed-tensors packed int4/int8, or bitsandbytes NF4),
rounded exactly as the torch reference rounds it, and accumulates `tl.dot` in fp32. Decode (few rows) splits K across programs so the grid
fills the device (partials are summed afterwards); prefill runs a plain tiled GEMM.

The launchers have the names and signatures of their references in `kernels/reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dequant import NF4, PACKED_INT, TL_DTYPES, _dequant_tile, code_table
from .triton_utils import cast, interpreting


@triton.jit
def _qmatmul_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on, stride_os,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    W_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        w = _dequant_tile(
            w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, k_mask[:, None] & n_mask[None, :],
            K, group_size, stride_wn, stride_wk, stride_sn, stride_sg,
            FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE, EXACT_BF16=UPCAST,
        )  # [BLOCK_K, BLOCK_N]
        w = cast(w, x_ptr.dtype.element_ty, UPCAST)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class Schedule:
    """How one launch tiles the problem: block sizes, K splits, and Triton's warps and stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def schedule_for(M: int, N: int, K: int, device: torch.device) -> Schedule:
    """The default schedule: a split-K GEMV for decode (M <= 16), a GEMM tile above."""
    if M <= 16:
        block_n, block_k = 64, 128
        tiles = triton.cdiv(N, block_n)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        # Enough programs to fill the device twice over, never a split shorter than one K block.
        split_k = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(K, block_k)))
        return Schedule(16, block_n, block_k, split_k)
    return Schedule(64, 64, 32)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    code: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    fmt: int,
    num_bits: int,
    group_size: int,
    N: int,
    K: int,
    w_dtype: torch.dtype,
    schedule: Schedule | None,
) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    M = x2.shape[0]
    sched = schedule or schedule_for(M, N, K, x.device)
    block_m, block_n, block_k = sched.block_m, sched.block_n, sched.block_k
    k_per_split = triton.cdiv(triton.cdiv(K, sched.split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    partial = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)  # [S, M, N]
    upcast = interpreting()  # in the interpreter: fp32 dots and hand-rounded bf16 casts
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _qmatmul_kernel[grid](
        x2, weight, scale, zero if zero is not None else scale, code if code is not None else scale, partial,
        M, N, K, group_size, k_per_split,
        x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1) if weight.dim() > 1 else 0,
        scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0,
        partial.stride(1), partial.stride(2), partial.stride(0),
        FORMAT=fmt, NUM_BITS=num_bits, HAS_ZERO=zero is not None,
        W_DTYPE=TL_DTYPES[w_dtype], UPCAST=upcast, IEEE=x.dtype == torch.float32 or upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=sched.num_warps, num_stages=sched.num_stages,
    )
    y = partial[0] if split_k == 1 else partial.sum(0)  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, N)


def qmatmul_packed_int(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    num_bits: int,
    in_features: int,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """x @ W.T + bias for a compressed-tensors packed int4/int8 weight; see the reference.

    `schedule` overrides the default tiling (`schedule_for`); benchmarks/kernels.py sweeps it.
    """
    N, G = weight_scale.shape
    assert x.shape[-1] == in_features and in_features % G == 0, (x.shape, in_features, G)
    return _launch(
        x, weight_packed, weight_scale, weight_zero_point, None, bias,
        fmt=PACKED_INT, num_bits=num_bits, group_size=in_features // G, N=N, K=in_features,
        w_dtype=weight_scale.dtype, schedule=schedule,
    )


def qmatmul_nf4(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    absmax: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """x @ W.T + bias for a bitsandbytes NF4 weight with float32 absmax; see the reference.

    `schedule` overrides the default tiling (`schedule_for`).
    """
    N, K = shape
    assert x.shape[-1] == K and absmax.dtype == torch.float32, (x.shape, shape, absmax.dtype)
    return _launch(
        x, weight_packed.reshape(-1), absmax, None, code_table(x.device), bias,
        fmt=NF4, num_bits=4, group_size=blocksize, N=N, K=K, w_dtype=dtype, schedule=schedule,
    )
