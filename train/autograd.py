"""The frozen quantized matmul as an autograd op: gradients flow to the input, never to the weight.

QLoRA keeps the base weight packed (NF4 or int4) and frozen; only the LoRA factors beside it
train. `FrozenQuantMatmul` is the one place the base weight meets autograd:

    forward:   y      = x @ W^T + b          W = dequant(packed), never stored
    backward:  dL/dx  = dL/dy @ W            (the chain rule through y = x W^T)
               dL/dW  = none, dL/db = none   (the base is frozen)

Forward calls the runtime's dequant-matmul op and backward its dequant op, through the backend
the quantized module was given (`kernel_backend`): the Triton kernels on CUDA, the torch
references on CPU. Only the module is saved for backward, so activation memory holds no float
copy of the weight, as bitsandbytes' `MatMul4Bit` and torchao's `LinearNF4` do.

A `dense` weight may stand in for the dequantization on both passes: a float copy made once from
the packed buffers. On CPU the reference dequant-matmul unpacks the whole matrix on every call
(three times a step with gradient checkpointing), which makes training slower than on float
weights; the copy trades the 4-bit memory saving for float speed, as the runtime's CPU executor
does. The packed buffers stay the source of truth and are never modified.

This file is the op only: which modules get LoRA and how the factors are kept is `train/lora.py`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.model.quant import NF4Linear, PackedIntLinear

QuantLinear = NF4Linear | PackedIntLinear


class FrozenQuantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)^T + b with dL/dx = dL/dy @ dequant(W) and no weight or bias gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: QuantLinear, dense: torch.Tensor | None) -> torch.Tensor:
        ctx.base, ctx.dense = base, dense
        if dense is not None:
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return F.linear(x, dense.to(x.dtype), bias)
        return base(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.dense if ctx.dense is not None else ctx.base.dequantize()  # [N, K]
        return grad_y @ weight.to(grad_y.dtype), None, None


def frozen_quant_matmul(x: torch.Tensor, base: QuantLinear, dense: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W)^T + b of the quantized module `base`, differentiable in `x` only.

    Args:
        x: activations [..., K].
        base: an `NF4Linear` or `PackedIntLinear`; its buffers are read, never written.
        dense: a float copy of `base.dequantize()` to use instead of the packed weight, or None.

    Returns:
        [..., N] in `x`'s dtype (the op's dtype when `dense` is None).
    """
    return FrozenQuantMatmul.apply(x, base, dense)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is one of the runtime's packed linear modules."""
    return isinstance(module, (NF4Linear, PackedIntLinear))
