"""Triton dequant-matmul on the kernels' layout: y = x @ W.T + bias, dispatched by the number of rows M.

Three paths (`tuning.Config.path`), chosen per problem by `tuning.config_for`:

- `gemv` (M = 1..4, decode): each program decodes a [BLOCK_K, BLOCK_N] tile of W.T once and
  multiplies it with every row (products and sums in float32 registers, no tensor cores);
- `dot` (a few dozen rows): the same tiles through `tl.dot` with 16- to 64-row blocks of x;
- `dequant` (many rows, prefill): W.T decoded into a scratch buffer shared by every layer of a
  device, then one float matmul (cuBLAS on a GPU).

The first two split K over programs so the grid fills the device. Their partial sums are reduced
in the same launch: each split adds its tile into a float32 workspace with atomics and counts
itself in a per-tile counter; the split that counts last reads the sum back while zeroing it
(an atomic exchange), resets the counter, adds the bias and stores in x's dtype. The workspace is
thus left zeroed for the next call, so a CUDA graph replays it without a memset; it and the
scratch are allocated once per device and grown when a larger problem comes (a graph's capture
must follow a warm-up call of each shape, as CUDA graphs require anyway). The sum's order varies
between runs on a GPU (atomics), by float32 rounding only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import TL_DTYPES
from .layout import KernelWeight
from .triton_utils import cast, interpreting
from .tuning import Config, config_for, tuning_key
from .unpack import _decode_kt_tile, dequant_weight, group_arg, kernel_args


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, m_mask, n_mask, N, out_ptr, stride_om, bias_ptr, work_ptr, work_bits_ptr, lock_ptr, lock_id,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """Store acc [BLOCK_M, BLOCK_N] + bias in the output's dtype, once every K split has added its part."""
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_ty = out_ptr.dtype.element_ty
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, cast(acc, out_ty, EXACT_BF16), mask=mask)
    else:
        w_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(work_ptr + w_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's adds are done before the count says so
        if tl.atomic_add(lock_ptr + lock_id, 1) == SPLIT_K - 1:  # acq_rel: every other split's adds are in
            total = tl.atomic_xchg(work_bits_ptr + w_offs, 0, mask=mask).to(tl.float32, bitcast=True)
            tl.atomic_xchg(lock_ptr + lock_id, 0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, cast(total, out_ty, EXACT_BF16), mask=mask)


@triton.jit
def _tiles(
    x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, offs_m, offs_n, m_mask, n_mask, k0, k_end, N, stride_xm,
    GROUP: tl.constexpr, FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    W_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x[offs_m, k0:k0 + BLOCK_K] [BLOCK_M, BLOCK_K] as stored, and W.T's tile [BLOCK_K, BLOCK_N] in
    float32 rounded to W_DTYPE; both zero past `k_end`."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < k_end
    w = _decode_kt_tile(
        w_ptr, scale_ptr, zero_ptr, code_ptr, offs_k, offs_n, k_mask, n_mask, N,
        GROUP=GROUP, FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE, EXACT_BF16=EXACT_BF16,
    )
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                other=0.0)
    return x, w


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, bias_ptr, out_ptr, work_ptr, work_bits_ptr, lock_ptr,
    M, N, K, k_per_split, stride_xm, stride_om,
    GROUP: tl.constexpr, FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (column block n, K split k): every row's partial product over its K range.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ty = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Products accumulate elementwise in float32 registers, summed along K once at the end.
    acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        x, w = _tiles(x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, offs_m, offs_n, m_mask, n_mask, k0, k_end, N,
                      stride_xm, GROUP=GROUP, FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE,
                      EXACT_BF16=EXACT_BF16, BLOCK_K=BLOCK_K)
        if W_DTYPE != x_ty:  # W in x's dtype, as the reference multiplies it
            w = cast(w, x_ty, EXACT_BF16).to(tl.float32)
        acc3 += x.to(tl.float32)[:, :, None] * w[None, :, :]
    acc = tl.sum(acc3, axis=1)  # [BLOCK_M, BLOCK_N]
    _epilogue(acc, offs_m, offs_n, m_mask, n_mask, N, out_ptr, stride_om, bias_ptr, work_ptr, work_bits_ptr,
              lock_ptr, pid_n, SPLIT_K=SPLIT_K, HAS_BIAS=HAS_BIAS, EXACT_BF16=EXACT_BF16)


@triton.jit
def _dot_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, bias_ptr, out_ptr, work_ptr, work_bits_ptr, lock_ptr,
    M, N, K, k_per_split, stride_xm, stride_om,
    GROUP: tl.constexpr, FORMAT: tl.constexpr, NUM_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (row block m, column block n, K split k).
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ty = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        x, w = _tiles(x_ptr, w_ptr, scale_ptr, zero_ptr, code_ptr, offs_m, offs_n, m_mask, n_mask, k0, k_end, N,
                      stride_xm, GROUP=GROUP, FORMAT=FORMAT, NUM_BITS=NUM_BITS, HAS_ZERO=HAS_ZERO, W_DTYPE=W_DTYPE,
                      EXACT_BF16=EXACT_BF16, BLOCK_K=BLOCK_K)
        w = cast(w, x_ty, EXACT_BF16)  # W.T's tile is the dot's right operand as it lies
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton_utils)
            x, w = x.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    lock_id = pid_m * tl.num_programs(1) + pid_n
    _epilogue(acc, offs_m, offs_n, m_mask, n_mask, N, out_ptr, stride_om, bias_ptr, work_ptr, work_bits_ptr,
              lock_ptr, lock_id, SPLIT_K=SPLIT_K, HAS_BIAS=HAS_BIAS, EXACT_BF16=EXACT_BF16)


class _Workspace:
    """One device's float32 split-K workspace (always left zeroed), tile counters, and dequant scratch.

    A buffer outgrown is kept, not freed: a CUDA graph captured earlier still reads and writes it
    on every replay. Each grows at least twofold, so few are ever kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Never empty: a kernel's pointer argument must be a real allocation even when unused.
        self.work = torch.zeros(1, dtype=torch.float32, device=device)
        self.locks = torch.zeros(1, dtype=torch.int32, device=device)
        self.scratch = torch.empty(0, dtype=torch.uint8, device=device)
        self.outgrown: list[torch.Tensor] = []

    def _grown(self, old: torch.Tensor, size: int, make) -> torch.Tensor:
        if old.numel() >= size:
            return old
        if old.numel() > 1:
            self.outgrown.append(old)
        return make(max(size, 2 * old.numel()))

    def split_k(self, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.work = self._grown(self.work, elements, lambda n: torch.zeros(n, dtype=torch.float32, device=self.device))
        self.locks = self._grown(self.locks, tiles, lambda n: torch.zeros(n, dtype=torch.int32, device=self.device))
        return self.work, self.locks

    def transposed_weight(self, K: int, N: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = K * N * torch.empty((), dtype=dtype).element_size()
        self.scratch = self._grown(self.scratch, nbytes, lambda n: torch.empty(n, dtype=torch.uint8, device=self.device))
        return self.scratch[:nbytes].view(dtype).view(K, N)


_workspaces: dict[torch.device, _Workspace] = {}


def workspace(device: torch.device) -> _Workspace:
    """The workspace of `device`, made on first use."""
    if device not in _workspaces:
        _workspaces[device] = _Workspace(device)
    return _workspaces[device]


def qlinear(
    x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None, *, config: Config | None = None
) -> torch.Tensor:
    """x @ W.T + bias in x's dtype for a weight in the kernels' layout; see `reference.qlinear`.

    `config` overrides the tuned or default configuration (`tuning.config_for`): the tests and the
    tuner run every path through it.
    """
    N, K = weight.shape
    assert x.shape[-1] == K and x.dtype in TL_DTYPES, (x.shape, weight.shape, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if config is None:
        key = tuning_key(M, N, K, group_size=weight.group_size, num_bits=weight.num_bits,
                         has_zero=weight.zero is not None, fmt=weight.fmt, dtype=x.dtype)
        config = config_for(key, M, N, K, x.device)
    space = workspace(x.device)
    if config.path == "dequant" or M == 0:
        w_t = dequant_weight(weight, out=space.transposed_weight(K, N, x.dtype))  # [K, N] in x's dtype
        y = x2 @ w_t if bias is None else torch.addmm(bias.to(x.dtype), x2, w_t)
        return y.view(*lead, N)
    if config.path == "gemv":
        assert M <= config.block_m, f"the GEMV config {config} covers {config.block_m} rows, not {M}"
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    block_k = config.block_k
    k_per_split = triton.cdiv(triton.cdiv(K, config.split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    grid_m, grid_n = triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n)
    work, locks = space.split_k(M * N if split_k > 1 else 0, grid_m * grid_n if split_k > 1 else 0)
    exact = interpreting()
    common = dict(
        GROUP=group_arg(weight), FORMAT=weight.fmt, NUM_BITS=weight.num_bits, HAS_ZERO=weight.zero is not None,
        HAS_BIAS=bias is not None,
        W_DTYPE=TL_DTYPES[weight.dtype], EXACT_BF16=exact, SPLIT_K=split_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    args = (x2, *kernel_args(weight), out if bias is None else bias, out, work, work.view(torch.int32), locks,
            M, N, K, k_per_split, x2.stride(0), out.stride(0))
    if config.path == "gemv":
        _gemv_kernel[(grid_n, split_k)](*args, **common)
    else:
        _dot_kernel[(grid_m, grid_n, split_k)](*args, UPCAST=exact, IEEE=x.dtype == torch.float32 or exact, **common)
    return out.view(*lead, N)
