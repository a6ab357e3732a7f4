"""Weights in onnxruntime's `com.microsoft::MatMulNBits` layout: repacked from our packed int
checkpoints, or quantized from float.

MatMulNBits stores a linear's weight W [N, K] row by row, in blocks of `block_size` along K:
`B` uint8 [N, K/block, block*bits/8] with the lower bits first (for 4 bits: element 2i in the low
nibble, 2i+1 in the high), `scales` float32 [N, K/block], and optional uint8 zero points packed the
same way per row ([N, ceil(K/block*bits/8)]); without them the zero point is 2^(bits-1). It
dequantizes w = (u - zero) * scale with u unsigned.

compressed-tensors packs signed values q in [-2^(b-1), 2^(b-1)) with w = (q - z) * s, so u = q + 2^(b-1)
and zero = z + 2^(b-1) hold exactly the same weight: a group-wise checkpoint whose group size is a
power of two >= 16 repacks bit for bit, with no second rounding. Anything else (per-channel int8,
NF4, float) is dequantized to float and quantized here: 4 bits asymmetric with zero points by the
converter's MSE search (`quantize.quantize_int`, as `convert --scheme int4-asym --calibration mse`
writes), 8 bits symmetric by round-to-nearest. This file only computes arrays; it builds no graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..kernels.reference import unpack_int32
from ..runtime.model.quant import NF4Linear, PackedIntLinear
from .quantize import quantize_int


@dataclass
class NBitsWeight:
    """One weight in MatMulNBits' layout.

    Attributes:
        bits: 4 or 8.
        block_size: weights per scale along K (a power of two >= 16).
        values: uint8 [N, K_padded], the unsigned quantized values, one per element (unpacked;
            `packed()` packs them).
        scales: float32 [N, K_padded / block_size].
        zero_points: uint8 [N, K_padded / block_size], unpacked; None for the implicit 2^(bits-1).
        in_features: K before padding.
        exact: True when repacked from the checkpoint bit for bit (no rounding here).
    """

    bits: int
    block_size: int
    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    in_features: int
    exact: bool

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def blocks(self) -> int:
        return self.scales.shape[1]

    def packed(self) -> np.ndarray:
        """B: uint8 [N, blocks, block_size * bits / 8], lower bits first."""
        v = self.values.reshape(self.out_features, self.blocks, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(v)
        return np.ascontiguousarray(v[..., 0::2] | (v[..., 1::2] << 4))

    def packed_zero_points(self) -> np.ndarray | None:
        """The zero points as MatMulNBits reads them: uint8 [N, ceil(blocks * bits / 8)], or None."""
        if self.zero_points is None:
            return None
        if self.bits == 8:
            return np.ascontiguousarray(self.zero_points)
        z = self.zero_points
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))

    def dequantize(self) -> np.ndarray:
        """The float32 weight [N, K] this stands for (the MatMulNBits semantics, computed in numpy)."""
        zero = self.zero_points if self.zero_points is not None else np.full_like(self.scales, 1 << (self.bits - 1), np.uint8)
        v = self.values.reshape(self.out_features, self.blocks, self.block_size).astype(np.float32)
        w = (v - zero[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]


def concat_rows(weights: list[NBitsWeight]) -> NBitsWeight:
    """Stack weights of the same K, bits and block size along N (fused q/k/v or gate/up); exact
    when each part is, since MatMulNBits keeps every row's blocks to itself."""
    first = weights[0]
    assert all(w.bits == first.bits and w.block_size == first.block_size and w.in_features == first.in_features for w in weights)
    if all(w.zero_points is None for w in weights):
        zero = None
    else:
        implicit = 1 << (first.bits - 1)
        zero = np.concatenate([
            w.zero_points if w.zero_points is not None else np.full(w.scales.shape, implicit, np.uint8) for w in weights
        ])
    return NBitsWeight(
        bits=first.bits, block_size=first.block_size,
        values=np.concatenate([w.values for w in weights]), scales=np.concatenate([w.scales for w in weights]),
        zero_points=zero, in_features=first.in_features, exact=all(w.exact for w in weights),
    )


def can_repack(module: nn.Module, bits: int) -> bool:
    """Whether `module`'s packed weight maps onto MatMulNBits at `bits` bit for bit."""
    return (
        isinstance(module, PackedIntLinear)
        and module.num_bits == bits
        and module.group_size is not None
        and module.group_size >= 16
        and module.group_size & (module.group_size - 1) == 0
    )


def to_nbits(module: nn.Module, bits: int, block_size: int) -> NBitsWeight:
    """MatMulNBits weight of a linear-like module: repacked when `can_repack`, else quantized
    from its float (or dequantized) weight with `block_size`.

    Args:
        module: an `nn.Linear`, `PackedIntLinear` or `NF4Linear`.
        bits: 4 or 8.
        block_size: block size for weights quantized here (a repacked weight keeps its group size).

    Returns:
        The weight in MatMulNBits' layout.
    """
    if can_repack(module, bits):
        return repack(module)
    if isinstance(module, (PackedIntLinear, NF4Linear)):
        weight = module.dequantize()
    else:
        weight = module.weight
    return quantize(weight.detach().float().numpy(), bits, block_size)


def repack(module: PackedIntLinear) -> NBitsWeight:
    """Our compressed-tensors packed weight as MatMulNBits values, bit for bit: u = q + 2^(b-1),
    zero = z + 2^(b-1)."""
    offset = 1 << (module.num_bits - 1)
    q = unpack_int32(module.weight_packed, module.num_bits, module.in_features)  # int8 [N, K]
    values = (q.to(torch.int16) + offset).to(torch.uint8).numpy()
    zero = None
    if module.weight_zero_point is not None:
        zero = (module.weight_zero_point.to(torch.int16) + offset).to(torch.uint8).numpy()
    return NBitsWeight(
        bits=module.num_bits, block_size=module.group_size, values=values,
        scales=module.weight_scale.float().numpy().copy(), zero_points=zero, in_features=module.in_features, exact=True,
    )


def quantize(weight: np.ndarray, bits: int, block_size: int) -> NBitsWeight:
    """Block quantization of a float weight [N, K]: 4 bits asymmetric (the asymmetric MSE search,
    a scale and zero point per block refit by least squares over candidate codes), 8 bits
    symmetric (absmax / 127, implicit zero 128). K is zero-padded to whole blocks.

    Args:
        weight: float32 [N, K].
        bits: 4 or 8.
        block_size: a power of two >= 16.

    Returns:
        The quantized weight.
    """
    n, k = weight.shape
    padded = -(-k // block_size) * block_size
    w = np.zeros((n, padded), np.float32)
    w[:, :k] = weight
    if bits == 8:
        blocks = w.reshape(n, padded // block_size, block_size)
        scale = np.abs(blocks).max(axis=-1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
        zero = None
    else:
        # A weight with no fixed checkpoint grid: the search beats min-max at no cost per token
        # (docs/benchmarks.md has the perplexities).
        found = quantize_int(torch.from_numpy(w), num_bits=4, group_size=block_size, symmetric=False, mse=True)
        assert found.zero_point is not None
        q = found.q.numpy().astype(np.int16) + 8  # u = q + 2^(b-1), zero = z + 2^(b-1)
        zero = (found.zero_point.numpy().astype(np.int16) + 8).astype(np.uint8)
        scale = found.scale.numpy()
    return NBitsWeight(
        bits=bits, block_size=block_size, values=q.astype(np.uint8).reshape(n, padded),
        scales=scale.astype(np.float32), zero_points=zero, in_features=k, exact=False,
    )
