"""Putting LoRA adapters on a loaded model: slot stacks on its projections, adapters copied into slots.

`add_lora_slots` wraps chosen linear modules (float `nn.Linear`, stacked q/k/v or gate/up, or
quantized modules alike) in `LoRALinear` stacks sharing one `SlotMapping`; `load_into_slot`
copies an adapter into one slot of every stack (and clears that slot where the adapter has no
module); `apply_adapter` does both for the single-adapter case (`quadapt generate --adapter`):
one slot, every token uses it.

The serving registry (runtime/engine/registry.py) builds on these: it lists the slots once
(`lora_modules`) and writes adapters into them while the engine runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .peft import PeftAdapter
from .peft_fit import BaseModules, check_adapter_fits, load_adapter_for
from ..errors import AdapterError
from ..model.lora import LoRALinear, LoRAWeights, SlotMapping, SlotTarget, is_linear_like


def lora_modules(model: nn.Module) -> dict[str, SlotTarget]:
    """Where each adapter module loads: HF module name -> its `SlotTarget` (`set_slot(slot, weights)`,
    `clear_slot(slot)`). A one-section stack is listed as itself, by the name of the module it
    wrapped; a stack on stacked projections (q/k/v) gives one `LoRASection` per targeted section,
    by the section's own name (`model.layers.0.self_attn.k_proj`).

    The objects live as long as their stacks, so a caller may list them once and keep the result
    (the registry does) instead of walking the model on every slot write.
    """
    stacks: dict[str, SlotTarget] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        if len(module.section_names) == 1:
            stacks[name] = module
            continue
        parent = name.rpartition(".")[0]
        for section, handle in module.sections.items():
            stacks[f"{parent}.{section}" if parent else section] = handle
    return stacks


def projection_names(model: nn.Module, targets: Collection[str]) -> list[str]:
    """HF names of the decoder-layer projections whose short names are in `targets`, a stacked
    module's sections included (`model.layers.0.self_attn.k_proj` of the stacked `qkv_proj`)."""
    names = []
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        parent, _, short = name.rpartition(".")
        sections = getattr(module, "section_names", ())
        if sections and not isinstance(module, LoRALinear):
            names.extend(f"{parent}.{section}" for section in sections if section in targets)
        elif short in targets and is_linear_like(module):
            names.append(name)
    return names


def add_lora_slots(
    model: nn.Module, module_names: Iterable[str], *, num_slots: int, max_rank: int, max_tokens: int = 0
) -> SlotMapping:
    """Wrap each named linear module of `model` in a `LoRALinear` stack of `num_slots` empty slots.

    A name may be a section of a stacked module (`...self_attn.k_proj` of the stacked `qkv_proj`): the
    stacked module gets one stack whose sections are the named ones. The stacks' buffers take the
    dtype and device of the model's first float parameter (the embedding in a `CausalLM`), i.e.
    the activations'.

    Args:
        model: the model, modified in place.
        module_names: HF names of the modules to wrap (`model.layers.0.self_attn.q_proj`).
        num_slots: how many adapters the stacks hold at once.
        max_rank: the largest adapter rank a slot accepts.
        max_tokens: the most tokens a forward pass gives per-token slots for (`SlotMapping.set_tokens`).

    Returns:
        The `SlotMapping` every new stack reads; set it to choose slots per token (initially -1: none).

    Raises:
        AdapterError: the model already has LoRA stacks, or a name is not a linear-like module.
    """
    if lora_modules(model):
        raise AdapterError(
            "the model already carries LoRA slots; load further adapters into its slots with load_into_slot, "
            "or start from a freshly loaded model"
        )
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    bases: dict[str, tuple[nn.Module, set[str] | None]] = {}
    for name in module_names:  # check every name before changing the model
        wrapped, base, section = _slot_base(model, name)
        if section is None:
            bases[wrapped] = (base, None)
        else:
            bases.setdefault(wrapped, (base, set()))[1].add(section)
    mapping = SlotMapping(num_slots, max_tokens).to(device)
    backend = getattr(model, "kernel_backend", None)  # resolved by the loader
    for name, (base, sections) in bases.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        stack = LoRALinear(base, mapping, max_rank, dtype=dtype, device=device, backend=backend, targets=sections)
        setattr(parent, child, stack)
    return mapping


def _slot_base(model: nn.Module, name: str) -> tuple[str, nn.Module, str | None]:
    """(name of the module to wrap, that module, the section `name` is in it or None) for the
    projection `name`.

    Raises:
        AdapterError: no such module, or not a linear-like one.
    """
    try:
        base = model.get_submodule(name)
    except AttributeError:
        parent_name, _, short = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        for child, module in (parent.named_children() if parent is not None else ()):
            if short in getattr(module, "section_names", ()):
                return f"{parent_name}.{child}" if parent_name else child, module, short
        raise AdapterError(f"the model has no module {name!r} to put LoRA slots on") from None
    if not is_linear_like(base):
        raise AdapterError(
            f"module {name!r} is a {type(base).__name__}, not a linear layer with in_features/out_features; "
            "LoRA slots go on linear projections only"
        )
    return name, base, None


def load_into_slot(model: nn.Module, adapter: Mapping[str, LoRAWeights], slot: int) -> None:
    """Copy an adapter into `slot` of every LoRA stack; stacks it does not cover get that slot cleared.

    Args:
        model: a model with LoRA stacks (`add_lora_slots`).
        adapter: HF module name -> factors; check it against the base first (`check_adapter_fits`).
        slot: the slot to fill.

    Raises:
        AdapterError: the adapter has a module without a LoRA stack.
        InvalidParameterError: the slot is out of range, or a rank exceeds the stacks' max rank.
    """
    stacks = lora_modules(model)
    missing = [name for name in adapter if name not in stacks]
    if missing:
        raise AdapterError(
            f"the adapter has LoRA weights for {', '.join(missing[:4])}, but the model has no LoRA slots there; "
            "add slots for every module the served adapters target"
        )
    for name, stack in stacks.items():
        if name in adapter:
            stack.set_slot(slot, adapter[name])
        else:
            stack.clear_slot(slot)


def apply_adapter(model: nn.Module, adapter: str | Path | PeftAdapter) -> SlotMapping:
    """Put one adapter on `model`: LoRA slots on the modules it targets, the adapter in slot 0,
    every token using slot 0.

    Args:
        model: a loaded model (float or quantized linear layers), modified in place.
        adapter: a PEFT adapter directory, or a `PeftAdapter` already read.

    Returns:
        The model's `SlotMapping` (set it to -1 to run the base alone).

    Raises:
        AdapterError, UnsupportedError: the adapter is malformed, unsupported, or made for another base.
    """
    if lora_modules(model):  # checked first: a wrapped model's layout is not the base's
        raise AdapterError("the model already carries LoRA slots; apply an adapter to a freshly loaded model")
    base = BaseModules.of_model(model)
    if isinstance(adapter, PeftAdapter):
        check_adapter_fits(adapter, base)
        peft_adapter = adapter
    else:
        peft_adapter = load_adapter_for(adapter, base)
    mapping = add_lora_slots(model, peft_adapter.modules, num_slots=1, max_rank=peft_adapter.max_rank)
    load_into_slot(model, peft_adapter.modules, 0)
    mapping.set(0)
    return mapping
