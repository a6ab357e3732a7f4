"""Projections that read the same input, held as one module: q/k/v of attention, gate/up of the MLP.

A small batch's matmul costs little arithmetic and one parallel region's start (CPU) or one
kernel launch (GPU); three projections of one input in one matmul pay for one instead of three.
So `CausalLM` has one `qkv_proj` and one `gate_up_proj` per layer, whatever the weight format
(gpt-fast's `wqkv`, vLLM's `QKVParallelLinear`): a float `FusedLinear` (the weights stacked by rows,
the output the sections side by side), or a packed module of the stacked rows
(`PackedIntLinear.stack`, `NF4Linear.stack`). `Attention` and `MLP` split the output back.

Checkpoints, adapters, converters and training name the projections as Hugging Face does
(`model.layers.0.self_attn.k_proj`): `STACKED` maps those names to a stacked module and its section,
every stacked module names its sections (`section_names`, `section_sizes`), and `section(name)`
gives one projection's module back (its weights are views of the stacked rows). The loader
writes a checkpoint's q/k/v and gate/up tensors into the stacked modules (`stack_modules`).

LoRA slots go on such a module as on any linear: one `lora.LoRALinear` with a section per
projection, each loaded by its own HF name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidParameterError
from .quant import NF4Linear, PackedIntLinear

# The stacked module's name in its parent, and the HF projections whose rows it holds, in order.
STACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_SECTION_OF = {member: group for group, members in STACKED.items() for member in members}


def stacked_name(name: str) -> tuple[str, str | None]:
    """(the module holding HF module `name`, the section `name` is in it or None): a stacked
    projection (`model.layers.0.self_attn.k_proj`) is a section of its stacked module
    (`model.layers.0.self_attn.qkv_proj`, "k_proj"); any other name is its own module."""
    parent, _, short = name.rpartition(".")
    group = _SECTION_OF.get(short)
    if group is None:
        return name, None
    return (f"{parent}.{group}" if parent else group), short


class FusedLinear(nn.Module):
    """Several float linears over one input as one: y = x @ [W_1; W_2; ...].T (+ [b_1; b_2; ...]).

    Args:
        in_features: the input size, shared by every section.
        sections: (name, out_features) of each section, in output order.
        bias: whether every section adds a bias.
        dtype, device: of the weight (the current defaults if None; built on meta by the loader).
    """

    def __init__(
        self, in_features: int, sections: Sequence[tuple[str, int]], *, bias: bool,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.section_names: tuple[str, ...] = tuple(name for name, _ in sections)
        self.section_sizes: tuple[int, ...] = tuple(size for _, size in sections)
        self.in_features = in_features
        self.out_features = sum(self.section_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize as `nn.Linear` initializes each section (the bounds depend on in_features only)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linears(cls, linears: Sequence[tuple[str, nn.Linear]]) -> FusedLinear:
        """The stack of `linears` (name, float `nn.Linear`) in output order, their weights copied in.

        Raises:
            InvalidParameterError: they differ in input size, dtype or bias, or one is not an `nn.Linear`.
        """
        first = linears[0][1]
        for name, linear in linears:
            if type(linear) is not nn.Linear or linear.in_features != first.in_features \
                    or linear.weight.dtype != first.weight.dtype or (linear.bias is None) != (first.bias is None):
                raise InvalidParameterError(
                    f"cannot fuse {name} ({type(linear).__name__}): fused projections are float nn.Linear layers "
                    "with one input size, one dtype, and a bias on all or none"
                )
        with torch.device("meta"):
            module = cls(first.in_features, [(n, lin.out_features) for n, lin in linears], bias=first.bias is not None)
        with torch.no_grad():
            module.weight = nn.Parameter(torch.cat([lin.weight.detach() for _, lin in linears]), requires_grad=False)
            if first.bias is not None:
                module.bias = nn.Parameter(torch.cat([lin.bias.detach() for _, lin in linears]), requires_grad=False)
        return module

    def section(self, name: str) -> nn.Linear:
        """Section `name` as an `nn.Linear` whose weight (and bias) are views of this module's rows."""
        rows = section_rows(self, name)
        linear = nn.Linear(self.in_features, rows.stop - rows.start, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.detach()[rows], requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach()[rows], requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sections={dict(zip(self.section_names, self.section_sizes))}"


def section_rows(module: nn.Module, name: str) -> slice:
    """The output rows of section `name` of a stacked module.

    Raises:
        InvalidParameterError: the module has no such section.
    """
    names = tuple(getattr(module, "section_names", ()))
    if name not in names:
        raise InvalidParameterError(f"{type(module).__name__} has sections {names}, not {name!r}")
    i = names.index(name)
    start = sum(module.section_sizes[:i])
    return slice(start, start + module.section_sizes[i])


def stack_modules(members: Sequence[tuple[str, nn.Module]], dtype: torch.dtype) -> nn.Module:
    """One module for the projections `members` (name, module) that read one input, in order.

    Float `nn.Linear`s become a `FusedLinear`; packed modules of one format that can stack become
    a packed module of that format (`PackedIntLinear.stack`, `NF4Linear.stack`). Members that
    cannot stack packed (mixed formats, as `convert --keep` on one of them leaves; an NF4 weight
    that is not a whole number of blocks) are dequantized into `dtype` and stacked as a
    `FusedLinear`: the same values, at float memory for that group.
    """
    kinds = {type(m) for _, m in members}
    if kinds == {nn.Linear}:
        return FusedLinear.from_linears(members)
    if len(kinds) == 1 and kinds <= {PackedIntLinear, NF4Linear}:
        stacked = kinds.pop().stack(members)
        if stacked is not None:
            return stacked
    return FusedLinear.from_linears([(name, as_float_linear(m, dtype)) for name, m in members])


def as_float_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """`module` as a float `nn.Linear` of `dtype`: itself if it is one of that dtype, else a new
    one holding its (dequantized) weight."""
    if type(module) is nn.Linear and module.weight.dtype == dtype:
        return module
    weight = module.weight.detach() if type(module) is nn.Linear else module.dequantize()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear


def checkpoint_module(model: nn.Module, name: str) -> nn.Module:
    """The module of HF linear `name` in `model`: itself, or its section of a stacked module
    (`section`, weights viewing the stacked rows)."""
    holder, section = stacked_name(name)
    module = model.get_submodule(holder)
    return module if section is None else module.section(section)


def checkpoint_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The float parameter HF name `name` (`...self_attn.k_proj.weight`) stands for in `model`: the
    parameter itself, or a view of its section's rows in a stacked `FusedLinear`."""
    module_name, _, param = name.rpartition(".")
    holder, section = stacked_name(module_name)
    module = model.get_submodule(holder)
    tensor = getattr(module, param)
    return tensor if section is None else tensor[section_rows(module, section)]


def stack_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors by HF name with each stacked group's sections joined under the stacked
    module's name (`self_attn.qkv_proj.weight` from q_proj's, k_proj's, v_proj's), for
    `load_state_dict` on a model or a layer. A group missing a section is left as it is, so
    `load_state_dict` names it."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module_name, _, param = name.rpartition(".")
        holder, section = stacked_name(module_name)
        if section is None:
            out[name] = tensor
        else:
            groups.setdefault(f"{holder}.{param}", {})[section] = tensor
    for name, parts in groups.items():
        members = STACKED[name.rpartition(".")[0].rpartition(".")[2]]
        if set(parts) == set(members):
            out[name] = torch.cat([parts[m] for m in members])
        else:
            holder = name.rpartition(".")[0].rpartition(".")[0]
            out.update({f"{holder}.{m}.{name.rpartition('.')[2]}": parts[m] for m in parts})
    return out


def checkpoint_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` by name, in model order, a stacked module given as its sections by
    their HF names (`model.layers.0.self_attn.k_proj`, see `section`): the modules a checkpoint's
    tensors name."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        sections = getattr(module, "section_names", ())
        if sections and hasattr(module, "section"):
            parent = name.rpartition(".")[0]
            out.update((f"{parent}.{s}" if parent else s, module.section(s)) for s in sections)
        else:
            out[name] = module
    return out


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under a checkpoint's HF names: each stacked module's tensors split into
    its sections' (`self_attn.q_proj.weight`, ...), views of the stacked rows."""
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        sections = getattr(module, "section_names", ())
        if not sections or not isinstance(module, FusedLinear):
            state[name] = tensor
            continue
        parent = module_name.rpartition(".")[0]
        for section in sections:
            state[f"{parent}.{section}.{param}" if parent else f"{section}.{param}"] = tensor[section_rows(module, section)]
    return state
