"""Trainable LoRA around a frozen base linear (packed NF4/int4, or float), and putting it in a model.

    y = base(x) + scale * dropout(x) @ A^T @ B^T        A [r, in], B [out, r], scale = alpha / r

A and B are `nn.Parameter`s and the scale is kept apart (PEFT's layout, so the factors save as
they are); the base is frozen: a quantized base runs through `train.autograd.frozen_quant_matmul`
(input gradient only), a float `nn.Linear` through `F.linear` with its weight frozen. A starts as
PEFT's default (Kaiming-uniform) and B as zeros, so a fresh adapter changes nothing; `loftq_init`
starts both from the truncated SVD of the quantization error instead.

This is the training-side twin of `runtime/model/lora.py`, whose slot stacks serve many adapters with
the scale folded into B; it holds no optimizer, data or files (`train/loop.py`, `train/files.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.errors import InvalidParameterError
from ..runtime.model.lora import LoRAWeights
from .autograd import frozen_quant_matmul, is_quantized

# The projections of a decoder layer LoRA may target (the runtime serves these).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QLoRALinear(nn.Module):
    """A frozen base linear plus trainable LoRA factors; see the module docstring.

    Args:
        base: an `NF4Linear`, a `PackedIntLinear` or an `nn.Linear`; frozen, never modified.
        rank: r.
        alpha: the LoRA alpha (scale = alpha / r).
        dropout: dropout probability on the LoRA branch's input.
        dtype: dtype of A and B (fp32 on CPU, bf16 on GPU).
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise InvalidParameterError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidParameterError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.dense: torch.Tensor | None = None  # see `keep_dense_copy`

    def keep_dense_copy(self, dtype: torch.dtype) -> None:
        """Hold a float copy of the quantized base's weight for both passes (CPU speed; see
        `train/autograd.py`). A float base needs none."""
        if is_quantized(self.base):
            with torch.no_grad():
                self.dense = self.base.dequantize().to(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_quantized(self.base):
            return frozen_quant_matmul(x, self.base, self.dense)
        return F.linear(x, self.base.weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        h = self.dropout(x.to(self.lora_A.dtype))
        delta = (h @ self.lora_A.t()) @ self.lora_B.t()
        return y.add(delta.to(y.dtype), alpha=self.scale)  # one fused scale-and-add

    def weights(self) -> LoRAWeights:
        """The factors as the runtime and PEFT hold them (delta W = alpha / r * B @ A)."""
        return LoRAWeights(a=self.lora_A.detach(), b=self.lora_B.detach(), alpha=self.alpha)

    def loftq_init(self, weight: torch.Tensor) -> float:
        """Start A and B from the rank-r truncated SVD of W - dequant(Q(W)) (LoftQ, one step), so
        that base + scale * B @ A is the best rank-r approximation of the float W.

        Args:
            weight: the float weight W [out, in] the quantized base was made from.

        Returns:
            The relative error ||W - (dequant(Q(W)) + scale B A)|| / ||W - dequant(Q(W))||.

        Raises:
            InvalidParameterError: the weight's shape does not fit, or the base is not quantized.
        """
        if not is_quantized(self.base):
            raise InvalidParameterError("LoftQ initialization needs a quantized base; this module's base is float")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InvalidParameterError(
                f"LoftQ weight of shape {tuple(weight.shape)} does not fit a [{self.out_features}, {self.in_features}] module"
            )
        with torch.no_grad():
            residual = weight.float().to(self.lora_A.device) - self.base.dequantize().float()
            U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
            root = S[: self.rank].sqrt() / math.sqrt(self.scale)  # split sqrt(S) over B and A, scale removed
            self.lora_B.copy_(U[:, : self.rank] * root)
            self.lora_A.copy_(root[:, None] * Vh[: self.rank])
            left = residual - self.scale * (self.lora_B.float() @ self.lora_A.float())
            return float(left.norm() / residual.norm().clamp_min(1e-12))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


def add_lora(model: nn.Module, targets: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
             dtype: torch.dtype = torch.float32, layers: Iterable[int] | None = None) -> dict[str, QLoRALinear]:
    """Freeze `model` and wrap each decoder-layer projection named in `targets` in a `QLoRALinear`.

    Args:
        model: a runtime `CausalLM` (float or quantized linears), modified in place.
        targets: short names of projections (`q_proj`, `v_proj`, ...; see `TARGETS`).
        rank, alpha, dropout, dtype: as `QLoRALinear`.
        layers: the decoder layers to adapt (PEFT's `layers_to_transform`); None for all. Backward
            stops at the lowest adapted layer, so adapting the top layers only is cheaper.

    Returns:
        HF module name (`model.layers.0.self_attn.q_proj`) -> its new module, sorted by name.

    Raises:
        InvalidParameterError: a target that is not a projection name, no targets, or a layer
            index the model does not have.
    """
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise InvalidParameterError(
            f"LoRA targets {unknown or targets} are not projection names; choose from {', '.join(TARGETS)}"
        )
    n_layers = len(model.model.layers)
    chosen = set(range(n_layers)) if layers is None else set(layers)
    if not chosen or not chosen <= set(range(n_layers)):
        raise InvalidParameterError(
            f"LoRA layers {sorted(chosen)} are not all layers of this model; choose from 0 to {n_layers - 1}"
        )
    model.requires_grad_(False)
    names = sorted(
        n for n, m in model.named_modules()
        if n.startswith("model.layers.") and n.rsplit(".", 1)[-1] in targets and not isinstance(m, QLoRALinear)
        and int(n.split(".")[2]) in chosen
    )
    modules = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        wrapped = QLoRALinear(model.get_submodule(name), rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
        setattr(model.get_submodule(parent), child, wrapped)
        modules[name] = wrapped
    return modules


def lora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    """The `QLoRALinear`s of `model` by HF module name (the base's name, without `.base`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def lora_parameters(modules: Mapping[str, QLoRALinear]) -> dict[str, nn.Parameter]:
    """`<module>.lora_A` / `<module>.lora_B` -> parameter: every trainable tensor, in a fixed order."""
    return {f"{n}.{f}": getattr(m, f) for n, m in sorted(modules.items()) for f in ("lora_A", "lora_B")}


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None)
    if tensor is None:
        tensor = next(module.parameters())
    return tensor.device
