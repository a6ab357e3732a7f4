"""The kernels' weight layout: packed words along K stored transposed [K / per_word, N], scales [G, N].

The on-disk formats lay a weight out row by row ([N, K]: compressed-tensors packed int4/int8
words along K, bitsandbytes NF4 bytes over the flattened matrix). The GPU kernels read it
transposed instead (GemLite's layout): a program's N columns are then adjacent in memory for
every K step, so a tile is one coalesced load per K row of words, and a tile decodes by a shift
per K row, never a register reshape. `KernelWeight` holds a weight so laid out:

- packed int: `weight_packed.t()`, the same words and bits; scales and zero points transposed to
  [G, N];
- NF4: the 4-bit codes repacked into the same int32 words (element k of a column at bits
  4 * (k % 8) of word k // 8, the code itself, no offset), absmax as [G, N] for G = K / blocksize.
  A weight whose blocks straddle rows has no such layout (`repack_nf4` gives None).

The repack is exact and has an exact inverse (`standard_packed_int`, `standard_nf4`), so a
module repacked at load still saves the bytes it loaded. Pure torch: importing this imports no
Triton. It does not read checkpoints or pick kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT, NF4 = 0, 1  # KernelWeight.fmt


@dataclass(frozen=True)
class KernelWeight:
    """One weight W [N, K] in the kernels' layout (see the module docstring).

    Attributes:
        words: int32 [ceil(K / per_word), N]; per_word = 32 // num_bits.
        scale: [G, N]: the compressed-tensors scales (their dtype), or NF4 absmax (float32).
        zero: int8 [G, N] zero points of an asymmetric int weight, else None.
        fmt: `INT` (offset-binary packed int4/int8) or `NF4` (4-bit code book indices).
        num_bits: 4 or 8.
        group_size: weights of a column per scale (K for one scale per channel).
        dtype: the dtype W rounds to once dequantized (the scales' for int; NF4's quant-state dtype).
    """

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: int
    num_bits: int
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return self.words.shape[1], self.scale.shape[0] * self.group_size

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def to(self, device: torch.device | str) -> KernelWeight:
        """The same weight on `device`."""
        move = (lambda t: None if t is None else t.to(device))
        return KernelWeight(move(self.words), move(self.scale), move(self.zero), self.fmt, self.num_bits,
                            self.group_size, self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (a module registers them as buffers)."""
        out = {"kernel_words": self.words, "kernel_scale": self.scale}
        if self.zero is not None:
            out["kernel_zero"] = self.zero
        return out

    def replace(self, **tensors: torch.Tensor) -> KernelWeight:
        """The same weight with `tensors` (names as `tensors()`) swapped in (after a module's `.to`)."""
        return KernelWeight(tensors.get("kernel_words", self.words), tensors.get("kernel_scale", self.scale),
                            tensors.get("kernel_zero", self.zero), self.fmt, self.num_bits, self.group_size, self.dtype)


def repack_packed_int(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    *,
    num_bits: int,
    in_features: int,
) -> KernelWeight:
    """A compressed-tensors packed int4/int8 weight (see `reference.dequant_packed_int`) in the kernels' layout."""
    N, G = weight_scale.shape
    assert weight_packed.shape == (N, -(-in_features * num_bits // 32)) and in_features % G == 0, (
        weight_packed.shape, weight_scale.shape, in_features)
    zero = None if weight_zero_point is None else weight_zero_point.t().contiguous()
    return KernelWeight(weight_packed.t().contiguous(), weight_scale.t().contiguous(), zero, INT, num_bits,
                        in_features // G, weight_scale.dtype)


def standard_packed_int(weight: KernelWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight_packed, weight_scale, weight_zero_point) of `weight` as compressed-tensors lays them out."""
    assert weight.fmt == INT
    zero = None if weight.zero is None else weight.zero.t().contiguous()
    return weight.words.t().contiguous(), weight.scale.t().contiguous(), zero


def repack_nf4(
    weight_packed: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> KernelWeight | None:
    """A bitsandbytes NF4 weight (see `reference.dequant_nf4`) in the kernels' layout, or None when
    its blocks straddle rows (K not a multiple of `blocksize`, or an odd block size)."""
    N, K = shape
    if K % blocksize or blocksize % 2:
        return None
    flat = weight_packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(N, K).to(torch.int32)  # high nibble first
    words = _pack_columns(codes.t(), 4)  # [ceil(K/8), N]
    return KernelWeight(words, absmax.reshape(N, K // blocksize).t().contiguous(), None, NF4, 4, blocksize, dtype)


def standard_nf4(weight: KernelWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_packed uint8 [N*K/2], absmax float32 [N*K / blocksize]) of `weight`, as bitsandbytes lays them out."""
    assert weight.fmt == NF4
    N, K = weight.shape
    codes = unpack_columns(weight.words, 4, K).t().reshape(-1, 2).to(torch.uint8)  # [N*K/2, 2]
    return (codes[:, 0] << 4) | codes[:, 1], weight.scale.t().reshape(-1).contiguous()


def unpack_columns(words: torch.Tensor, num_bits: int, size: int) -> torch.Tensor:
    """The raw fields [size, N] of int32 words [W, N] packed along the first dimension (int32, no offset)."""
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=words.device)
    fields = (words.unsqueeze(1) >> shifts[None, :, None]) & ((1 << num_bits) - 1)  # [W, per_word, N]
    return fields.reshape(-1, words.shape[1])[:size]


def _pack_columns(fields: torch.Tensor, num_bits: int) -> torch.Tensor:
    """int32 words [ceil(K / per_word), N] of fields [K, N] (each < 2^num_bits), element k at bits num_bits * (k % per_word)."""
    per_word = 32 // num_bits
    K, N = fields.shape
    padded = torch.zeros(-(-K // per_word) * per_word, N, dtype=torch.int64, device=fields.device)
    padded[:K] = fields
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64, device=fields.device)
    words = (padded.view(-1, per_word, N) << shifts[None, :, None]).sum(1)  # disjoint bits: the sum is an OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
