"""Projections that read the same input, run as one matmul: q/k/v of attention, gate/up of the MLP.

On a CPU a small batch's matmul costs little arithmetic and one parallel region's start and end;
three projections of one input in one matmul pay for one region instead of three. `fuse_projections`
replaces a model's float `q_proj`, `k_proj`, `v_proj` by one `qkv_proj` and `gate_proj`, `up_proj` by
one `gate_up_proj` (`FusedLinear`: the weights stacked by rows, the output the sections side by side);
`Attention` and `MLP` split the output back. The values are those of the separate projections.

`FusedLoRALinear` adds LoRA slots to such a module with the layout of `LoRALinear.fuse_shrink`: the
base weight's rows and then every slot's A in one matrix, so one GEMM gives the base output and every
slot's shrink. A slot's A holds each section's factors one after the other (rank R per section), and
its B is block-diagonal: section k's output rows read section k's R columns only, so a section's LoRA
never leaks into another's output. Each section is addressed by its own HF name through
`section_stacks` (`model.layers.0.self_attn.k_proj`), so adapters load into it as into a
`LoRALinear`.

This is the CPU executor's layout, chosen at start (runtime/executor.py). Quantized modules are not
fused: on a GPU their kernels read packed weights and already run one launch per projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..kernels import NO_SLOT
from ..kernels import cpu as cpu_kernels
from .errors import InvalidParameterError
from .lora import LoRAWeights, SlotMapping, check_slot_fits, copy_into_slot

# The fused module's name in its parent, and the projections it replaces, in output order.
FUSED_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FusedLinear(nn.Module):
    """Several float linears over one input as one: y = x @ [W_1; W_2; ...].T (+ [b_1; b_2; ...]).

    Args:
        linears: (name, nn.Linear) in output order; same `in_features`, dtype and device, and all or
            none with a bias.
    """

    def __init__(self, linears: Sequence[tuple[str, nn.Linear]]) -> None:
        super().__init__()
        first = linears[0][1]
        for name, linear in linears:
            if type(linear) is not nn.Linear or linear.in_features != first.in_features \
                    or linear.weight.dtype != first.weight.dtype or (linear.bias is None) != (first.bias is None):
                raise InvalidParameterError(
                    f"cannot fuse {name} ({type(linear).__name__}): fused projections are float nn.Linear layers "
                    "with one input size, one dtype, and a bias on all or none"
                )
        self.section_names = tuple(name for name, _ in linears)
        self.section_sizes = tuple(linear.out_features for _, linear in linears)
        self.in_features = first.in_features
        self.out_features = sum(self.section_sizes)
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([lin.weight for _, lin in linears]), requires_grad=False)
            bias = None if first.bias is None else torch.cat([lin.bias for _, lin in linears])
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sections={dict(zip(self.section_names, self.section_sizes))}"


def fuse_projections(model: nn.Module) -> int:
    """Replace each group of `FUSED_GROUPS` whose members are all float `nn.Linear` layers by one
    `FusedLinear` under the group's name. Returns how many groups were fused."""
    fused = 0
    for parent in list(model.modules()):
        for group, members in FUSED_GROUPS.items():
            linears = [getattr(parent, m, None) for m in members]
            if not all(type(lin) is nn.Linear for lin in linears):
                continue
            setattr(parent, group, FusedLinear(list(zip(members, linears))))
            for m in members:
                delattr(parent, m)
            fused += 1
    return fused


class FusedLoRALinear(nn.Module):
    """A `FusedLinear` plus LoRA slots per section; see the module docstring.

    Args:
        base: the fused projections.
        mapping: the model's shared `SlotMapping`.
        max_rank: the largest rank a section's adapter may have.
        targets: the sections that take adapters (the others keep zero factors and no name).
    """

    def __init__(self, base: FusedLinear, mapping: SlotMapping, max_rank: int, targets: Sequence[str]) -> None:
        super().__init__()
        if max_rank < 1:
            raise InvalidParameterError(f"max_rank must be a positive integer, got {max_rank}")
        self.mapping = mapping
        self.max_rank = max_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.section_names, self.section_sizes = base.section_names, base.section_sizes
        self.targets = tuple(t for t in base.section_names if t in targets)
        S, R = mapping.num_slots, max_rank * len(self.section_names)
        weight = base.weight
        with torch.no_grad():
            fused = torch.cat([weight, weight.new_zeros(S * R, self.in_features)])  # [out + S*R, in]
        self.register_buffer("weight", fused)
        self.bias = base.bias
        # [out, S, R] seen as [S, out, R], as in `LoRALinear`: the expand reads B_all without a copy.
        self.register_buffer("lora_b", weight.new_zeros(self.out_features, S, R).permute(1, 0, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.mapping.token_slots(x.shape[:-1])
        if isinstance(slots, int) and slots == NO_SLOT:
            return nn.functional.linear(x, self.weight[: self.out_features], self.bias)
        x2 = x.reshape(-1, self.in_features)  # [..., in] -> [N, in]
        if isinstance(slots, int):  # one slot for every token: its factors alone
            R = self.lora_b.shape[2]
            a = self.weight[self.out_features + slots * R: self.out_features + (slots + 1) * R]  # [R, in]
            y = nn.functional.linear(x2, self.weight[: self.out_features], self.bias)
            return torch.addmm(y, x2 @ a.T, self.lora_b[slots].T).view(*x.shape[:-1], self.out_features)
        full = nn.functional.linear(x2, self.weight)  # [N, out + S*R]: base output, then every shrink
        y = full[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return cpu_kernels.expand_lora(y, full[:, self.out_features:], self.lora_b, slots).view(
            *x.shape[:-1], self.out_features
        )

    def section_stacks(self) -> dict[str, _Section]:
        """The targeted sections by their own short names (`k_proj`), each with `set_slot` and
        `clear_slot` as a `LoRALinear` has."""
        return {name: _Section(self, self.section_names.index(name)) for name in self.targets}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, sections={dict(zip(self.section_names, self.section_sizes))}, "
                f"slots={self.mapping.num_slots}, max_rank={self.max_rank}")


class _Section:
    """One section of a `FusedLoRALinear`, loaded and cleared like a `LoRALinear`."""

    def __init__(self, stack: FusedLoRALinear, index: int) -> None:
        self.stack, self.index = stack, index
        self.in_features = stack.in_features
        self.out_features = stack.section_sizes[index]
        self.max_rank = stack.max_rank
        self._rows = slice(sum(stack.section_sizes[:index]), sum(stack.section_sizes[: index + 1]))

    def _a(self, slot: int) -> torch.Tensor:
        """This section's A block of `slot`: [max_rank, in], a view of the fused weight."""
        s = self.stack
        start = s.out_features + (slot * len(s.section_names) + self.index) * s.max_rank
        return s.weight[start: start + s.max_rank]

    def _b(self, slot: int) -> torch.Tensor:
        """This section's B block of `slot`: [out_section, max_rank], a view of `lora_b`."""
        R = self.stack.max_rank
        return self.stack.lora_b[slot, self._rows, self.index * R: (self.index + 1) * R]

    def set_slot(self, slot: int, weights: LoRAWeights) -> None:
        """Copy one adapter's factors for this section into `slot`, as `LoRALinear.set_slot` does.

        Raises:
            InvalidParameterError: the slot is out of range, the rank exceeds `max_rank`, or the
                factors' shapes do not fit this section.
        """
        self._check_slot(slot)
        check_slot_fits(weights, max_rank=self.max_rank, in_features=self.in_features, out_features=self.out_features)
        copy_into_slot(self._a(slot), self._b(slot), weights)

    def clear_slot(self, slot: int) -> None:
        """Zero this section's factors in `slot`."""
        self._check_slot(slot)
        with torch.no_grad():
            self._a(slot).zero_()
            self._b(slot).zero_()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.stack.mapping.num_slots:
            raise InvalidParameterError(
                f"LoRA slot {slot} is out of range; slots are 0..{self.stack.mapping.num_slots - 1}"
            )
