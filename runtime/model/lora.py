"""LoRA on top of any linear-like base module, as stacks of adapter slots selected per token.

A `LoRALinear` wraps a base module that has `in_features`, `out_features` and `forward(x)` (an
`nn.Linear`, or a quantized linear module) and adds, for each token, the LoRA of the slot that
token selects:

    y = base(x) + (x @ A[s].T) @ B[s].T        s = slot of the token; s = -1 adds nothing

The slots are two buffers created once, `lora_a` [S, R, in] and `lora_b` [S, out, R] with R the
largest rank the stack accepts. An adapter of rank r < R is zero-padded, which adds exact zeros,
and its scale (alpha/r, or alpha/sqrt(r) for rsLoRA) is folded into B when it is copied in, so the
computation has no per-adapter scalar. This is vLLM's slot layout (`lora_a_stacked` /
`lora_b_stacked`): the engine serves many adapters in one batch by giving each token its slot;
`kernels.add_lora` computes it (Triton on a GPU, the torch reference elsewhere).

A base that stacks several projections (q/k/v in one `fused.FusedLinear`) gets one stack with a
section per projection, as vLLM's packed modules: each section loads by its own HF name
(`LoRASection`), and its LoRA reaches its own output rows only.

On a CPU, `fuse_shrink` keeps a float base weight and every slot's A in one [out + S*R, in]
matrix, so one GEMM gives both the base output and every slot's x @ A.T (`kernels.lora_linear`).

Every `LoRALinear` of a model shares one `SlotMapping`, the per-token slot choice for the
current forward pass, so the model's forward signature does not change.

This file is the math only: it does not read adapter files (runtime/checkpoints/peft.py), decide which
modules of a model get slots, or manage which adapter sits in which slot (runtime/checkpoints/adapters.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ... import kernels
from ...kernels import NO_SLOT  # a token with this slot gets the base output only
from ..errors import AdapterError, InvalidParameterError


@dataclass(frozen=True)
class LoRAWeights:
    """One module's LoRA factors, in PEFT's orientation: delta W = scale * b @ a.

    Attributes:
        a: `lora_A` [r, in_features].
        b: `lora_B` [out_features, r].
        alpha: `lora_alpha` for this module.
        use_rslora: the scale is alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not (self.a.dim() == 2 and self.b.dim() == 2 and self.a.shape[0] == self.b.shape[1]):
            raise AdapterError(
                f"LoRA factors disagree: lora_A {tuple(self.a.shape)} and lora_B {tuple(self.b.shape)}; expected "
                "lora_A [r, in_features] and lora_B [out_features, r] with the same rank r"
            )

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self) -> torch.Tensor:
        """The weight update scale * b @ a [out, in], computed in fp32."""
        return (self.b.float() @ self.a.float()) * self.scale


def is_linear_like(module: nn.Module) -> bool:
    """Whether `module` can carry LoRA: it has int `in_features` and `out_features` (an `nn.Linear`
    or a quantized linear module)."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


class SlotMapping:
    """Which slot each token of the current forward pass uses; shared by a model's LoRA modules.

    `slots` is an int (every token uses that slot; `NO_SLOT` for none) or an int64 tensor: [B]
    for one slot per sequence, [B, T] (the input's leading shape) for one per token, or [N] for
    the N tokens of a batch laid end to end.

    `set` checks the slots it is given (which reads them on the host); `set_tokens` copies
    already-valid per-token slots into a buffer allocated once, in place and without a host
    sync, as a CUDA graph needs: the engine's path, whose slots come from its registry.
    """

    def __init__(self, num_slots: int, max_tokens: int = 0) -> None:
        if num_slots < 1:
            raise InvalidParameterError(f"a LoRA slot stack needs at least one slot, got num_slots={num_slots}")
        self.num_slots = num_slots
        self.slots: int | torch.Tensor = NO_SLOT
        self._buffer = torch.full((max_tokens,), NO_SLOT, dtype=torch.int64)

    def to(self, device: torch.device | str) -> SlotMapping:
        """Move the per-token buffer to `device` (the model's); returns self."""
        self._buffer = self._buffer.to(device)
        return self

    def set(self, slots: int | torch.Tensor) -> None:
        """Choose the slots for the next forward passes.

        Raises:
            InvalidParameterError: a slot outside [-1, num_slots).
        """
        if isinstance(slots, torch.Tensor):
            bad = slots[(slots < NO_SLOT) | (slots >= self.num_slots)]
            if bad.numel():
                raise InvalidParameterError(
                    f"LoRA slot {int(bad[0])} is out of range; slots are 0..{self.num_slots - 1}, or -1 for none"
                )
            self.slots = slots.to(torch.int64, copy=True)  # ours: the caller may reuse its tensor
        else:
            if not NO_SLOT <= slots < self.num_slots:
                raise InvalidParameterError(
                    f"LoRA slot {slots} is out of range; slots are 0..{self.num_slots - 1}, or -1 for none"
                )
            self.slots = int(slots)

    def set_tokens(self, slots: torch.Tensor) -> None:
        """Per-token slots [N] for a batch laid end to end, copied into the fixed buffer, unchecked.

        The caller guarantees every slot is in [-1, num_slots) and N <= `max_tokens`.
        """
        n = slots.shape[0]
        assert n <= self._buffer.shape[0], f"{n} tokens exceed the slot buffer's {self._buffer.shape[0]}"
        self._buffer[:n].copy_(slots, non_blocking=True)
        self.slots = self._buffer[:n]

    def token_slots(self, leading_shape: torch.Size) -> int | torch.Tensor:
        """The slots for an input whose shape without its feature dim is `leading_shape`:
        an int, or an int64 tensor [N] with N = prod(leading_shape)."""
        if isinstance(self.slots, int):
            return self.slots
        slots = self.slots
        if slots.dim() == 1 and slots.numel() == leading_shape.numel():
            return slots  # one per token already: the same object for every layer of a pass
        if slots.numel() == leading_shape.numel():
            return slots.reshape(-1)
        if slots.dim() < len(leading_shape):  # per sequence: repeat over the sequence's tokens
            slots = slots.reshape(slots.shape + (1,) * (len(leading_shape) - slots.dim()))
        return slots.expand(leading_shape).reshape(-1)


def check_slot_fits(weights: LoRAWeights, *, max_rank: int, in_features: int, out_features: int) -> None:
    """Check that `weights` fit a slot of rank `max_rank` on an [out_features, in_features] weight.

    Raises:
        InvalidParameterError: the rank exceeds `max_rank`, or the factors' shapes do not fit.
    """
    if weights.rank > max_rank:
        raise InvalidParameterError(
            f"LoRA rank {weights.rank} exceeds this slot stack's max rank {max_rank}; "
            "build the slots with a larger max_rank"
        )
    if (weights.in_features, weights.out_features) != (in_features, out_features):
        raise InvalidParameterError(
            f"LoRA factors for a [{weights.out_features}, {weights.in_features}] weight do not fit a "
            f"[{out_features}, {in_features}] module"
        )


def copy_into_slot(a: torch.Tensor, b: torch.Tensor, weights: LoRAWeights) -> None:
    """Zero one slot's A [R, in] and B [out, R] blocks, then copy `weights` in: the rank
    zero-padded to R, the scale folded into B in fp32 and cast once (not rounded separately)."""
    r = weights.rank
    with torch.no_grad():
        a.zero_()
        b.zero_()
        a[:r].copy_(weights.a)
        b[:, :r].copy_(weights.b.float() * weights.scale)


class SlotTarget(Protocol):
    """Where one adapter module's factors load (`adapters.lora_modules`): a one-section
    `LoRALinear`, or one `LoRASection` of a stacked one."""

    in_features: int
    out_features: int
    max_rank: int

    def set_slot(self, slot: int, weights: LoRAWeights) -> None: ...

    def clear_slot(self, slot: int) -> None: ...


class LoRALinear(nn.Module):
    """A base linear-like module plus a stack of LoRA slots, in one or more output sections.

    A base whose output is several projections side by side (`fused.FusedLinear`: q, k and v)
    has one section per projection: a slot's A holds each section's factors one after the other
    (rank R each), and its B is block-diagonal, so section k's output rows read section k's R
    columns only and a section's LoRA never leaks into another's output. Each section loads by
    its own HF name through `sections` (see `adapters.lora_modules`). A plain base has one section.

    Args:
        base: the module to wrap; needs `in_features`, `out_features` and `forward(x)`; a base with
            `section_names` and `section_sizes` (a `FusedLinear`, a stacked packed module) gets one
            section each.
        mapping: the model's shared `SlotMapping` (its `num_slots` sizes the stack).
        max_rank: the largest rank a section's adapter may have.
        dtype: dtype of the slot buffers; should be the activations' dtype.
        device: where the slot buffers live.
        backend: the kernel backend (`kernels.resolve_backend`); None resolves it on each call.
        targets: the short names of the sections that take adapters; None for all. The others
            keep zero factors and get no entry in `sections`.
    """

    def __init__(
        self,
        base: nn.Module,
        mapping: SlotMapping,
        max_rank: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: kernels.Backend | None = None,
        targets: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if max_rank < 1:
            raise InvalidParameterError(f"max_rank must be a positive integer, got {max_rank}")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.section_names: tuple[str, ...] = tuple(getattr(base, "section_names", ())) or ("",)
        self.section_sizes: tuple[int, ...] = tuple(getattr(base, "section_sizes", ())) or (self.out_features,)
        self.mapping = mapping
        self.max_rank = max_rank
        self.kernel_backend = backend
        # Zero slots are exact no-ops, so a fresh stack changes nothing.
        S, R = mapping.num_slots, max_rank * len(self.section_names)
        self.register_buffer("lora_a", torch.zeros(S, R, self.in_features, dtype=dtype, device=device))
        # Stored [out, S, R] and seen as [S, out, R]: the CPU op reads every slot's B as one
        # [out, S*R] matrix without a copy, and the Triton kernel takes the strides as they are.
        b = torch.zeros(self.out_features, S, R, dtype=dtype, device=device)
        self.register_buffer("lora_b", b.permute(1, 0, 2))
        # [out + S*R, in] once `fuse_shrink` ran: the base weight's rows, then `lora_a`'s.
        self.fused_weight: torch.Tensor | None = None
        chosen = [i for i, name in enumerate(self.section_names) if targets is None or name in targets]
        self.sections: dict[str, LoRASection] = {self.section_names[i]: LoRASection(self, i) for i in chosen}

    def fuse_shrink(self) -> None:
        """Store the base weight and `lora_a` as the two halves of one matrix (see the module
        docstring); the CPU backend then computes the base output and the shrink in one GEMM
        (`kernels.lora_linear`). Both keep their names, values and shapes, so `set_slot` and a
        state dict work unchanged.

        Raises:
            InvalidParameterError: the base is not a float linear (`nn.Linear` or `FusedLinear`) of
                the slots' dtype and device, or the kernel backend is not "cpu".
        """
        base = self.base
        weight = getattr(base, "weight", None)
        if self.kernel_backend != "cpu" or not isinstance(weight, nn.Parameter) or weight.dtype != self.lora_a.dtype \
                or weight.device != self.lora_a.device:
            raise InvalidParameterError(
                "fuse_shrink needs a float nn.Linear base of the LoRA slots' dtype and device and the 'cpu' kernel "
                f"backend; got {type(base).__name__} on backend {self.kernel_backend!r}"
            )
        if self.fused_weight is not None:
            return
        S, R, K = self.lora_a.shape
        with torch.no_grad():
            fused = torch.cat([weight.detach(), self.lora_a.reshape(S * R, K)])  # [out + S*R, in]
        base.weight = nn.Parameter(fused[: self.out_features], requires_grad=False)
        self.lora_a = fused[self.out_features:].view(S, R, K)  # still the registered buffer
        self.fused_weight = fused

    def set_slot(self, slot: int, weights: LoRAWeights) -> None:
        """Copy one adapter's factors into `slot` of a one-section stack (`LoRASection.set_slot`).

        Raises:
            InvalidParameterError: the stack has several sections, the slot is out of range, the
                rank exceeds `max_rank`, or the factors' shapes do not fit this module.
        """
        self._only_section().set_slot(slot, weights)

    def clear_slot(self, slot: int) -> None:
        """Zero `slot` in every section, so tokens that select it get the base output."""
        self._check_slot(slot)
        with torch.no_grad():
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.mapping.token_slots(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)  # [..., in] -> [N, in]; the ops work on rows
        if self.fused_weight is not None:
            out = kernels.lora_linear(
                x2.to(self.fused_weight.dtype), self.fused_weight, self.base.bias, self.lora_b, slots,
                backend=self.kernel_backend,
            )
            return out.view(*x.shape[:-1], self.out_features)
        y = self.base(x)
        if isinstance(slots, int) and slots == NO_SLOT:
            return y
        y2 = y.reshape(-1, self.out_features)
        if self.kernel_backend == "triton" and y2.dtype == self.lora_a.dtype and y2.data_ptr() == y.data_ptr():
            # The base output is this call's own tensor: the expand adds into it in place.
            kernels.add_lora_(y2, x2.to(self.lora_a.dtype), self.lora_a, self.lora_b, slots, backend="triton")
            return y
        out = kernels.add_lora(y2, x2.to(self.lora_a.dtype), self.lora_a, self.lora_b, slots, backend=self.kernel_backend)
        return out.to(y.dtype).view(y.shape)

    def _only_section(self) -> LoRASection:
        if len(self.section_names) != 1:
            raise InvalidParameterError(
                f"this LoRA stack has sections {', '.join(self.section_names)}; load each through `sections[name]`"
            )
        return LoRASection(self, 0)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.mapping.num_slots:
            raise InvalidParameterError(f"LoRA slot {slot} is out of range; slots are 0..{self.mapping.num_slots - 1}")

    def extra_repr(self) -> str:
        sections = "" if len(self.section_names) == 1 else f", sections={dict(zip(self.section_names, self.section_sizes))}"
        return (f"in_features={self.in_features}, out_features={self.out_features}{sections}, "
                f"slots={self.mapping.num_slots}, max_rank={self.max_rank}")


class LoRASection:
    """One output section of a `LoRALinear` (the k of a stacked q/k/v), loaded and cleared alone.

    `adapters.lora_modules` lists these by the section's HF name; they are made once per stack,
    so a caller may keep them for the stack's life.
    """

    def __init__(self, stack: LoRALinear, index: int) -> None:
        self.stack, self.index = stack, index
        self.in_features = stack.in_features
        self.out_features = stack.section_sizes[index]
        self.max_rank = stack.max_rank
        start = sum(stack.section_sizes[:index])
        self._rows = slice(start, start + self.out_features)
        self._cols = slice(index * stack.max_rank, (index + 1) * stack.max_rank)

    def set_slot(self, slot: int, weights: LoRAWeights) -> None:
        """Copy one adapter's factors for this section into `slot`: scale folded into B, rank
        zero-padded to `max_rank`.

        Raises:
            InvalidParameterError: the slot is out of range, the rank exceeds `max_rank`, or the
                factors' shapes do not fit this section.
        """
        self.stack._check_slot(slot)
        check_slot_fits(weights, max_rank=self.max_rank, in_features=self.in_features, out_features=self.out_features)
        copy_into_slot(self.stack.lora_a[slot, self._cols], self.stack.lora_b[slot, self._rows, self._cols], weights)

    def clear_slot(self, slot: int) -> None:
        """Zero this section's factors in `slot`."""
        self.stack._check_slot(slot)
        with torch.no_grad():
            self.stack.lora_a[slot, self._cols].zero_()
            self.stack.lora_b[slot, self._rows, self._cols].zero_()
