"""Projections that read the same input, run as one matmul: q/k/v of attention, gate/up of the MLP.

On a CPU a small batch's matmul costs little arithmetic and one parallel region's start and end;
three projections of one input in one matmul pay for one region instead of three. `fuse_projections`
replaces a model's float `q_proj`, `k_proj`, `v_proj` by one `qkv_proj` and `gate_proj`, `up_proj` by
one `gate_up_proj` (`FusedLinear`: the weights stacked by rows, the output the sections side by side);
`Attention` and `MLP` split the output back. The values are those of the separate projections.

LoRA slots go on such a module as on any linear: one `lora.LoRALinear` with a section per
projection, each loaded by its own HF name (`model.layers.0.self_attn.k_proj`).

This is the CPU executor's layout, chosen at start (runtime/executor.py). Quantized modules are not
fused: on a GPU their kernels read packed weights and already run one launch per projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidParameterError

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
