"""Projections that read the same input, run as one matmul: q/k/v of attention, gate/up of the MLP.

A small batch's matmul costs little arithmetic and one parallel region's start (CPU) or one
kernel launch (GPU); three projections of one input in one matmul pay for one instead of three.
`fuse_projections` replaces a model's `q_proj`, `k_proj`, `v_proj` by one `qkv_proj` and
`gate_proj`, `up_proj` by one `gate_up_proj`, whatever their format: float layers become a
`FusedLinear` (the weights stacked by rows, the output the sections side by side), packed ones a
packed module of the stacked rows (gpt-fast's `wqkv`, vLLM's stacked parameters). `Attention` and
`MLP` split the output back. The values are those of the separate projections.

LoRA slots go on such a module as on any linear: one `lora.LoRALinear` with a section per
projection, each loaded by its own HF name (`model.layers.0.self_attn.k_proj`).

This is the engine's layout (`loader.serving_layout`); the reference generator and training keep
the checkpoint's separate projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidParameterError
from .quant import NF4Linear, PackedIntLinear

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
        self.section_names: tuple[str, ...] = tuple(name for name, _ in linears)
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
    """Replace each group of `FUSED_GROUPS` whose members share one weight format by one module
    under the group's name: a `FusedLinear` for float `nn.Linear` layers, a stacked packed module
    (`PackedIntLinear.stack`, `NF4Linear.stack`) for quantized ones. A group whose members cannot
    stack (mixed formats, an NF4 weight not a whole number of blocks) keeps its projections.
    Returns how many groups were fused."""
    fused = 0
    for parent in list(model.modules()):
        for group, members in FUSED_GROUPS.items():
            modules = [(m, getattr(parent, m, None)) for m in members]
            kind = type(modules[0][1])
            if kind not in (nn.Linear, PackedIntLinear, NF4Linear) or any(type(m) is not kind for _, m in modules):
                continue
            stacked = FusedLinear(modules) if kind is nn.Linear else kind.stack(modules)
            if stacked is None:
                continue
            setattr(parent, group, stacked)
            for m in members:
                delattr(parent, m)
            fused += 1
    return fused
