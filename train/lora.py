"""Trainable LoRA around a frozen base linear (packed NF4/int4, or float), and putting it in a model.

    y = base(x) + scale * dropout(x) @ A^T @ B^T        A [r, in], B [out, r], scale = alpha / r

A and B are `nn.Parameter`s and the scale is kept apart (PEFT's layout, so the factors save as
they are); the base is frozen: a quantized base runs through `train.autograd.frozen_quant_matmul`
(input gradient only), a float `nn.Linear` through `F.linear` with its weight frozen. A starts as
PEFT's default (Kaiming-uniform) and B as zeros, so a fresh adapter changes nothing; `loftq_init`
starts both from the truncated SVD of the quantization error instead.

A stacked base (q/k/v in one `qkv_proj`, the runtime's layout) gets a `StackedQLoRA`: the base
runs once and each targeted section has its own `QLoRALinear` factors, named and saved by the
section's HF name, so the adapter is PEFT's on the separate projections.

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
        self.stack: StackedQLoRA | None = None  # set (unregistered) when this is a section of one

    def __setattr__(self, name: str, value: object) -> None:
        if name == "stack":  # a back reference, not a child module
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def keep_dense_copy(self, dtype: torch.dtype) -> None:
        """Hold a float copy of the quantized base's weight for both passes (CPU speed; see
        `train/autograd.py`); a section's copy is its stack's, of the whole stacked weight. A
        float base needs none."""
        if self.stack is not None:
            self.stack.keep_dense_copy(dtype)
        elif is_quantized(self.base):
            with torch.no_grad():
                self.dense = self.base.dequantize().to(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_quantized(self.base):
            return frozen_quant_matmul(x, self.base, self.dense)
        return F.linear(x, self.base.weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        return y.add(self.delta(x).to(y.dtype), alpha=self.scale)  # one fused scale-and-add

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch before its scale: dropout(x) @ A^T @ B^T, in the factors' dtype."""
        h = self.dropout(x.to(self.lora_A.dtype))
        return (h @ self.lora_A.t()) @ self.lora_B.t()

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


class StackedQLoRA(nn.Module):
    """A frozen stacked base (q/k/v or gate/up in one module, `runtime.model.fused`) with a
    `QLoRALinear` per targeted section, by the section's HF short name: the base runs once, and each
    section's LoRA adds to its own output rows only, as PEFT's LoRA on the separate projection.

    Args:
        base: a stacked module (`FusedLinear`, or a stacked `NF4Linear` / `PackedIntLinear`);
            frozen, never modified.
        sections: the short names of the sections that get LoRA factors (`q_proj`, `v_proj`).
        rank, alpha, dropout, dtype: as `QLoRALinear`, for every section.
    """

    def __init__(self, base: nn.Module, sections: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.section_names: tuple[str, ...] = tuple(base.section_names)
        self.section_sizes: tuple[int, ...] = tuple(base.section_sizes)
        chosen = set(sections)
        self.sections = nn.ModuleDict({
            name: QLoRALinear(base.section(name), rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
            for name in self.section_names if name in chosen
        })
        for section in self.sections.values():
            section.stack = self
        self.dense: torch.Tensor | None = None  # see `keep_dense_copy`

    def keep_dense_copy(self, dtype: torch.dtype) -> None:
        """As `QLoRALinear.keep_dense_copy`, of the whole stacked weight, once."""
        if is_quantized(self.base) and self.dense is None:
            with torch.no_grad():
                self.dense = self.base.dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_quantized(self.base):
            y = frozen_quant_matmul(x, self.base, self.dense)
        else:
            y = F.linear(x, self.base.weight, self.base.bias)
        parts = []
        for name, size in zip(self.section_names, self.section_sizes):
            if name in self.sections:
                section = self.sections[name]
                parts.append(section.delta(x) * section.scale)
            else:  # no LoRA on this section: exact zeros
                parts.append(x.new_zeros(*x.shape[:-1], size, dtype=self._factor_dtype()))
        return y + torch.cat(parts, dim=-1).to(y.dtype)

    def _factor_dtype(self) -> torch.dtype:
        return next(iter(self.sections.values())).lora_A.dtype


def add_lora(model: nn.Module, targets: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
             dtype: torch.dtype = torch.float32, layers: Iterable[int] | None = None) -> dict[str, QLoRALinear]:
    """Freeze `model` and put a `QLoRALinear` on each decoder-layer projection named in `targets`:
    around the module of a plain projection (`o_proj`), or as a section of a `StackedQLoRA` around
    a stacked module (`k_proj` of `qkv_proj`).

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
    for i in sorted(chosen):
        for part in ("self_attn", "mlp"):
            parent = model.get_submodule(f"model.layers.{i}.{part}")
            for child, module in list(parent.named_children()):
                if isinstance(module, (QLoRALinear, StackedQLoRA)) or not isinstance(getattr(module, "in_features", None), int):
                    continue
                sections = [s for s in getattr(module, "section_names", ()) if s in targets]
                if sections:
                    wrapped: nn.Module = StackedQLoRA(module, sections, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
                elif child in targets:
                    wrapped = QLoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
                else:
                    continue
                setattr(parent, child, wrapped)
    return {name: m for name, m in lora_modules(model).items() if int(name.split(".")[2]) in chosen}


def lora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    """The `QLoRALinear`s of `model` by HF module name (the base's name, without `.base`; a
    section's by its own name, `model.layers.0.self_attn.k_proj`), sorted by name."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, StackedQLoRA):
            parent = name.rpartition(".")[0]
            modules.update((f"{parent}.{section}", lora) for section, lora in m.sections.items())
        elif isinstance(m, QLoRALinear) and m.stack is None:
            modules[name] = m
    return dict(sorted(modules.items()))


def lora_parameters(modules: Mapping[str, QLoRALinear]) -> dict[str, nn.Parameter]:
    """`<module>.lora_A` / `<module>.lora_B` -> parameter: every trainable tensor, in a fixed order."""
    return {f"{n}.{f}": getattr(m, f) for n, m in sorted(modules.items()) for f in ("lora_A", "lora_B")}


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None)
    if tensor is None:
        tensor = next(module.parameters())
    return tensor.device
