"""Quantized linear layers: modules that hold packed weight buffers and multiply through a kernel.

`PackedIntLinear` holds an int4 or int8 weight in compressed-tensors' packed layout (group-wise or
per-channel scales, optional zero points); `NF4Linear` holds a bitsandbytes NF4 weight with float32
block scales. Both stand in for `nn.Linear` (same `in_features`, `out_features`, `bias`), and
their forward is the dequant-matmul op of `kernels` (the torch reference on CPU, a Triton kernel
of the same name and signature on CUDA), run by the backend in `kernel_backend`: set once by the
loader, or None to resolve it from the environment on each call. `weight_format` names what the
weight is, for reports.

Projections that read one input (q, k and v) stack into one module of their format (`stack`):
the rows of the packed weights one after the other, `section_names` and `section_sizes` naming
each projection's rows, as `fused.FusedLinear` does for float weights; `section(name)` gives one
projection back as a module of its own, its buffers views of the stacked ones.

On Triton the loader repacks each module into the kernels' layout (`use_kernel_layout`: packed
words transposed to [K / per_word, N], scales [G, N]; see `kernels/layout.py`) and drops the
standard buffers; they stay readable by name (`weight_packed`, ...), restored exactly on demand,
and a state dict holds them, so a repacked model saves the bytes it loaded.

They do not quantize, read checkpoints or know tensor names on disk: the loader fills their
buffers, and the converters produce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

# The dispatching ops: Triton on CUDA, `kernels.reference` elsewhere (see `kernels/__init__.py`).
from ...kernels import Backend, dequant_nf4, dequant_packed_int, dequant_weight, qlinear, qmatmul_nf4, qmatmul_packed_int
from ...kernels import layout

WeightFormat = Literal["int4", "int8", "nf4"]


class _KernelLayout(nn.Module):
    """The kernels' layout beside a module's standard buffers (`use_kernel_layout`)."""

    _standard: tuple[str, ...] = ()  # the standard buffers' names, in the order `_restore` gives them
    _kernel_spec: tuple | None = None  # (fmt, num_bits, group_size, dtype) once repacked

    def _repack(self) -> layout.KernelWeight | None:
        raise NotImplementedError

    def _restore(self, weight: layout.KernelWeight) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def use_kernel_layout(self) -> bool:
        """Repack into the kernels' layout and drop the standard buffers; False (and nothing
        changed) for a weight that has no such layout (NF4 blocks straddling rows)."""
        if self._kernel_spec is not None:
            return True
        weight = self._repack()
        if weight is None:
            return False
        for name in self._standard:
            del self._buffers[name]
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        self._kernel_spec = (weight.fmt, weight.num_bits, weight.group_size, weight.dtype)
        return True

    @property
    def kernel_weight(self) -> layout.KernelWeight | None:
        """The weight in the kernels' layout, or None before `use_kernel_layout`."""
        if self._kernel_spec is None:
            return None
        zero = self._buffers.get("kernel_zero")
        return layout.KernelWeight(self._buffers["kernel_words"], self._buffers["kernel_scale"], zero,
                                   *self._kernel_spec)

    def __getattr__(self, name: str):
        if name in type(self)._standard and self.__dict__.get("_kernel_spec") is not None:
            return dict(zip(self._standard, self._restore(self.kernel_weight)))[name]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_spec is not None:  # the standard bytes, as loaded
            for name, tensor in zip(self._standard, self._restore(self.kernel_weight)):
                if tensor is not None:
                    destination[prefix + name] = tensor


class PackedIntLinear(_KernelLayout):
    """A linear layer whose weight is int4 or int8, packed as compressed-tensors packs it.

    Buffers:
        weight_packed: int32 [N, ceil(K * num_bits / 32)].
        weight_scale: [N, K / group_size] (or [N, 1] per channel), in `scale_dtype`.
        weight_zero_point: int8 [N, G] when asymmetric, else absent (None).
    """

    _standard = ("weight_packed", "weight_scale", "weight_zero_point")

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
        self.section_names: tuple[str, ...] = ()  # set by `stack`: the projections whose rows these are
        self.section_sizes: tuple[int, ...] = ()
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

    @classmethod
    def stack(cls, modules: Sequence[tuple[str, PackedIntLinear]]) -> PackedIntLinear | None:
        """One module whose rows are those of `modules` in order (each a section), or None when
        they differ in input size, bits, grouping, symmetry, scale dtype, bias or backend."""
        first = modules[0][1]
        spec = _int_spec(first)
        if not all(type(m) is cls and _int_spec(m) == spec for _, m in modules):
            return None
        sizes = tuple(m.out_features for _, m in modules)
        with torch.device("meta"):  # every buffer is replaced below
            module = cls(first.in_features, sum(sizes), num_bits=first.num_bits, group_size=first.group_size,
                         symmetric=first.symmetric, bias=first.bias is not None, scale_dtype=first.weight_scale.dtype)
        for key in ("weight_packed", "weight_scale", "weight_zero_point"):
            parts = [getattr(m, key) for _, m in modules]
            module._buffers[key] = None if parts[0] is None else torch.cat(parts)
        _stack_common(module, modules, sizes)
        return module

    def section(self, name: str) -> PackedIntLinear:
        """Section `name` of a stacked module (`stack`) as a module of its own, its buffers views of
        this module's rows."""
        rows = _section_rows(self, name)
        with torch.device("meta"):
            module = PackedIntLinear(self.in_features, rows.stop - rows.start, num_bits=self.num_bits,
                                     group_size=self.group_size, symmetric=self.symmetric, bias=self.bias is not None,
                                     scale_dtype=self.weight_scale.dtype)
        for key in ("weight_packed", "weight_scale", "weight_zero_point"):
            value = getattr(self, key)
            module._buffers[key] = None if value is None else value[rows]
        _section_common(module, self, rows)
        return module

    def _repack(self) -> layout.KernelWeight:
        return layout.repack_packed_int(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                        num_bits=self.num_bits, in_features=self.in_features)

    def _restore(self, weight: layout.KernelWeight) -> tuple[torch.Tensor | None, ...]:
        return layout.standard_packed_int(weight)

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] the packed buffers stand for, in the scales' dtype."""
        if self._kernel_spec is not None:
            return dequant_weight(self.kernel_weight, backend=self.kernel_backend)
        return dequant_packed_int(
            self.weight_packed, self.weight_scale, self.weight_zero_point,
            num_bits=self.num_bits, in_features=self.in_features, backend=self.kernel_backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_spec is not None:
            return qlinear(x, self.kernel_weight, self.bias, backend=self.kernel_backend)
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


class NF4Linear(_KernelLayout):
    """A linear layer whose weight is NF4 (bitsandbytes' 4-bit NormalFloat), block-scaled.

    Buffers:
        weight_packed: uint8 [ceil(N*K/2)], two codes a byte, the first in the high nibble.
        absmax: float32 [ceil(N*K / blocksize)]; a checkpoint's double-quantized scales are
            resolved into this at load, as bitsandbytes' own CPU path does.
    """

    _standard = ("weight_packed", "absmax")

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
        self.section_names: tuple[str, ...] = ()  # set by `stack`, as `PackedIntLinear`'s
        self.section_sizes: tuple[int, ...] = ()
        self.blocksize, self.dtype = blocksize, dtype
        self.kernel_backend: Backend | None = None
        n = in_features * out_features
        self.register_buffer("weight_packed", torch.empty((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(-(-n // blocksize), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def weight_format(self) -> WeightFormat:
        return "nf4"

    @classmethod
    def stack(cls, modules: Sequence[tuple[str, NF4Linear]]) -> NF4Linear | None:
        """One module whose rows are those of `modules` in order (each a section), or None when
        they differ in input size, block size, dtype, bias or backend, or a projection's weight
        count is not a whole number of blocks (its last block would straddle the next one's rows)."""
        first = modules[0][1]
        spec = (first.in_features, first.blocksize, first.dtype, first.bias is None, first.kernel_backend)
        if not all(type(m) is cls and (m.in_features, m.blocksize, m.dtype, m.bias is None, m.kernel_backend) == spec
                   and (m.in_features * m.out_features) % m.blocksize == 0 for _, m in modules):
            return None
        sizes = tuple(m.out_features for _, m in modules)
        with torch.device("meta"):  # every buffer is replaced below
            module = cls(first.in_features, sum(sizes), bias=first.bias is not None, blocksize=first.blocksize,
                         dtype=first.dtype)
        for key in ("weight_packed", "absmax"):  # flat over the matrix: rows in order, blocks whole
            module._buffers[key] = torch.cat([getattr(m, key).reshape(-1) for _, m in modules])
        _stack_common(module, modules, sizes)
        return module

    def section(self, name: str) -> NF4Linear:
        """Section `name` of a stacked module (`stack`) as a module of its own, its buffers views of
        this module's blocks (a section is a whole number of blocks, as `stack` requires)."""
        rows = _section_rows(self, name)
        first, count = rows.start * self.in_features, (rows.stop - rows.start) * self.in_features
        with torch.device("meta"):
            module = NF4Linear(self.in_features, rows.stop - rows.start, bias=self.bias is not None,
                               blocksize=self.blocksize, dtype=self.dtype)
        module._buffers["weight_packed"] = self.weight_packed[first // 2: (first + count) // 2]
        module._buffers["absmax"] = self.absmax[first // self.blocksize: (first + count) // self.blocksize]
        _section_common(module, self, rows)
        return module

    def _repack(self) -> layout.KernelWeight | None:
        return layout.repack_nf4(self.weight_packed, self.absmax, shape=(self.out_features, self.in_features),
                                 blocksize=self.blocksize, dtype=self.dtype)

    def _restore(self, weight: layout.KernelWeight) -> tuple[torch.Tensor | None, ...]:
        return layout.standard_nf4(weight)

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] the packed buffers stand for, in `self.dtype`."""
        if self._kernel_spec is not None:
            return dequant_weight(self.kernel_weight, backend=self.kernel_backend)
        return dequant_nf4(
            self.weight_packed, self.absmax, shape=(self.out_features, self.in_features),
            blocksize=self.blocksize, dtype=self.dtype, backend=self.kernel_backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_spec is not None:
            return qlinear(x, self.kernel_weight, self.bias, backend=self.kernel_backend)
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


def _int_spec(m: PackedIntLinear) -> tuple:
    zero = m.weight_zero_point is None
    return (m.in_features, m.num_bits, m.group_size, m.symmetric, zero, m.weight_scale.dtype, m.bias is None,
            m.kernel_backend)


def _stack_common(module: QuantLinear, modules: Sequence[tuple[str, QuantLinear]], sizes: tuple[int, ...]) -> None:
    """Give the stacked `module` its bias, section names and sizes, and kernel backend (both formats)."""
    if modules[0][1].bias is not None:
        module.bias = nn.Parameter(torch.cat([m.bias.detach() for _, m in modules]), requires_grad=False)
    module.section_names, module.section_sizes = tuple(name for name, _ in modules), sizes
    module.kernel_backend = modules[0][1].kernel_backend


def _section_rows(module: QuantLinear, name: str) -> slice:
    if name not in module.section_names:
        raise ValueError(f"{type(module).__name__} has sections {module.section_names}, not {name!r}")
    i = module.section_names.index(name)
    start = sum(module.section_sizes[:i])
    return slice(start, start + module.section_sizes[i])


def _section_common(module: QuantLinear, stacked: QuantLinear, rows: slice) -> None:
    """Give a section's `module` its rows of the stacked bias, and the kernel backend."""
    if stacked.bias is not None:
        module.bias = nn.Parameter(stacked.bias.detach()[rows], requires_grad=False)
    module.kernel_backend = stacked.kernel_backend
