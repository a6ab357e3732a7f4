"""Quantized linear layers: modules that hold packed weight buffers and multiply through a kernel.

`PackedIntLinear` holds an int4 or int8 weight in compressed-tensors' packed layout (group-wise or
per-channel scales, optional zero points); `NF4Linear` holds a bitsandbytes NF4 weight with float32
block scales. Both stand in for `nn.Linear` (same `in_features`, `out_features`, `bias`), and
their forward is the dequant-matmul op of `kernels` (the torch reference on CPU, a Triton kernel
of the same name and signature on CUDA), run by the backend in `kernel_backend`: set once by the
loader, or None to resolve it from the environment on each call. `weight_format` names what the
weight is, for reports.

They do not quantize, read checkpoints or know tensor names on disk: the loader fills their
buffers, and the converters produce them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

# The dispatching ops: Triton on CUDA, `kernels.reference` elsewhere (see `kernels/__init__.py`).
from ..kernels import Backend, dequant_nf4, dequant_packed_int, qmatmul_nf4, qmatmul_packed_int

WeightFormat = Literal["int4", "int8", "nf4"]


class PackedIntLinear(nn.Module):
    """A linear layer whose weight is int4 or int8, packed as compressed-tensors packs it.

    Buffers:
        weight_packed: int32 [N, ceil(K * num_bits / 32)].
        weight_scale: [N, K / group_size] (or [N, 1] per channel), in `scale_dtype`.
        weight_zero_point: int8 [N, G] when asymmetric, else absent (None).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool,
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build with empty buffers (on the current default device, e.g. meta).

        Args:
            in_features, out_features: K and N.
            num_bits: 4 or 8.
            group_size: input features per scale; None for one scale per output channel.
            symmetric: whether zero points are absent.
            bias: whether the layer adds a float bias.
            scale_dtype: dtype of the scales (the dequantized weight's dtype).
        """
        super().__init__()
        if num_bits not in (4, 8):
            raise ValueError(f"num_bits must be 4 or 8, got {num_bits}")
        if group_size is not None and (group_size < 1 or in_features % group_size):
            raise ValueError(
                f"group_size {group_size} does not divide in_features {in_features}; pick a group size that does, "
                "or None for one scale per output channel"
            )
        groups = 1 if group_size is None else in_features // group_size
        self.kernel_backend: Backend | None = None
        self.in_features, self.out_features = in_features, out_features
        self.num_bits, self.group_size, self.symmetric = num_bits, group_size, symmetric
        words = -(-in_features * num_bits // 32)
        self.register_buffer("weight_packed", torch.empty(out_features, words, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=scale_dtype))
        zero = None if symmetric else torch.empty(out_features, groups, dtype=torch.int8)
        self.register_buffer("weight_zero_point", zero)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def weight_format(self) -> WeightFormat:
        return "int4" if self.num_bits == 4 else "int8"

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] the packed buffers stand for, in the scales' dtype."""
        return dequant_packed_int(
            self.weight_packed, self.weight_scale, self.weight_zero_point,
            num_bits=self.num_bits, in_features=self.in_features, backend=self.kernel_backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul_packed_int(
            x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias,
            num_bits=self.num_bits, in_features=self.in_features, backend=self.kernel_backend,
        )

    def extra_repr(self) -> str:
        grouping = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.weight_format} "
            f"{kind} {grouping}, bias={self.bias is not None}"
        )


class NF4Linear(nn.Module):
    """A linear layer whose weight is NF4 (bitsandbytes' 4-bit NormalFloat), block-scaled.

    Buffers:
        weight_packed: uint8 [ceil(N*K/2)], two codes a byte, the first in the high nibble.
        absmax: float32 [ceil(N*K / blocksize)]; a checkpoint's double-quantized scales are
            resolved into this at load, as bitsandbytes' own CPU path does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        blocksize: int = 64,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build with empty buffers (on the current default device, e.g. meta).

        Args:
            in_features, out_features: K and N.
            bias: whether the layer adds a float bias.
            blocksize: weights per absmax over the flattened matrix (bitsandbytes' default 64).
            dtype: the weight's dtype when dequantized (bitsandbytes' quant-state dtype).
        """
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.dtype = blocksize, dtype
        self.kernel_backend: Backend | None = None
        n = in_features * out_features
        self.register_buffer("weight_packed", torch.empty((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(-(-n // blocksize), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def weight_format(self) -> WeightFormat:
        return "nf4"

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] the packed buffers stand for, in `self.dtype`."""
        return dequant_nf4(
            self.weight_packed, self.absmax, shape=(self.out_features, self.in_features),
            blocksize=self.blocksize, dtype=self.dtype, backend=self.kernel_backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul_nf4(
            x, self.weight_packed, self.absmax, self.bias,
            shape=(self.out_features, self.in_features), blocksize=self.blocksize, dtype=self.dtype,
            backend=self.kernel_backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4 "
            f"blocksize={self.blocksize}, dtype={self.dtype}, bias={self.bias is not None}"
        )


QuantLinear = PackedIntLinear | NF4Linear
