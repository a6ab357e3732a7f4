"""Triton fused dequant-matmul: y = x @ dequant(W).T + bias, the weight never materialized in full.

One kernel serves every weight format: each program decodes [BLOCK_N, BLOCK_K] weight tiles in
registers with `dequant._decode_tile` (compressed-tensors packed int4/int8, or bitsandbytes NF4),
reading rows along K as they lie in memory, and accumulates in fp32. Three regimes:

- one row (decode of one sequence): a GEMV with `tl.sum`, K split across programs so the grid
  fills the device (partials are summed afterwards);
- a few rows (batched decode): the same split-K schedule with `tl.dot` on 16-row tiles;
- many rows (prefill): a tiled GEMM.

The launchers have the names and signatures of their references in `kernels/reference.py`, plus
an optional `schedule` (`Schedule`) that benchmarks/kernels.py sweeps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dequant import NF4, PACKED_INT, TL_DTYPES, _decode_tile, code_table, scale_layout
from .triton_utils import cast, interpreting


@triton.jit
def _qmatmul_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_sg, stride_om, stride_os,
    FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SCALES: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, W_DTYPE: tl.constexpr, ROUND_W: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_dtype = x_ptr.dtype.element_ty
    if BLOCK_M == 1:  # GEMV: products accumulate elementwise in fp32, summed along K once at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < k_end, other=0.0).to(tl.float32)
            w = _decode_tile(
                w_ptr, scale_ptr, zero_ptr, code_ptr, offs_n, k0, n_mask,
                K, group_size, stride_wn, stride_sn, stride_sg,
                FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, SCALES=SCALES, GROUP=GROUP, EVEN_K=EVEN_K,
                BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )
            if ROUND_W:  # the weight's dtype rounds W first, as in the reference
                w = cast(w, W_DTYPE, UPCAST).to(tl.float32)
            acc += w * x[None, :]
        tl.store(out_ptr + pid_k * stride_os + pid_m * stride_om + offs_n, tl.sum(acc, axis=1), mask=n_mask)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k < k_end)[None, :], other=0.0,
            )
            w = _decode_tile(
                w_ptr, scale_ptr, zero_ptr, code_ptr, offs_n, k0, n_mask,
                K, group_size, stride_wn, stride_sn, stride_sg,
                FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, SCALES=SCALES, GROUP=GROUP, EVEN_K=EVEN_K,
                BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )  # [BLOCK_N, BLOCK_K]
            if W_DTYPE != x_dtype:  # W rounds to its own dtype first, as in the reference
                w = cast(w, W_DTYPE, UPCAST)
            w = cast(w, x_dtype, UPCAST)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
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


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def schedule_for(M: int, N: int, K: int, device: torch.device) -> Schedule:
    """The default schedule, from `benchmarks/kernels.py --sweep` on an H200 (docs/benchmarks.md).

    One row: the GEMV, K split so the grid fills the device; up to 16 rows: split-K 16-row tiles;
    above: a 128-row GEMM tile.
    """
    if M > 16:
        return Schedule(128, 64, 64, num_warps=8)
    block_m, block_n, block_k = (1, 32, 512) if M == 1 else (16, 128, 64)
    tiles = triton.cdiv(N, block_n)
    # Enough programs to fill the device twice over, never a split shorter than one K block.
    split_k = max(1, min(triton.cdiv(2 * _multiprocessors(device), tiles), triton.cdiv(K, block_k)))
    return Schedule(block_m, block_n, block_k, split_k)


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
    x2 = x.reshape(-1, K).contiguous()  # [M, K], rows contiguous
    M = x2.shape[0]
    sched = schedule or schedule_for(M, N, K, x.device)
    block_k = sched.block_k
    k_per_split = triton.cdiv(triton.cdiv(K, sched.split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    partial = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)  # [S, M, N]
    upcast = interpreting()  # in the interpreter: fp32 dots and hand-rounded bf16 casts
    scales, group, stride_sn, stride_sg = scale_layout(fmt, N, K, group_size, scale)
    grid = (triton.cdiv(M, sched.block_m), triton.cdiv(N, sched.block_n), split_k)
    _qmatmul_kernel[grid](
        x2, weight, scale, zero if zero is not None else scale, code if code is not None else scale, partial,
        M, N, K, group_size, k_per_split,
        x2.stride(0), weight.stride(0) if weight.dim() > 1 else 0, stride_sn, stride_sg,
        partial.stride(1), partial.stride(0),
        FORMAT=fmt, NUM_BITS=num_bits, HAS_ZERO=zero is not None, SCALES=scales, GROUP=group, EVEN_K=K % 2 == 0,
        W_DTYPE=TL_DTYPES[w_dtype], ROUND_W=w_dtype != torch.float32,
        UPCAST=upcast, IEEE=x.dtype == torch.float32 or upcast,
        BLOCK_M=sched.block_m, BLOCK_N=sched.block_n, BLOCK_K=block_k,
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
