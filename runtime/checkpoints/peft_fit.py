"""Checking a LoRA adapter against its base model: exactly the modules PEFT would wrap, the right shapes.

A base is described by its module layout (`BaseModules`): every module name and the [out, in] of
its linear layers, taken from a loaded model (float or quantized: any module with `in_features`
and `out_features` counts as linear) or from a checkpoint's config.json alone (the model is built
on the meta device, no weights read). `check_adapter_fits` then insists that the adapter's
modules are exactly those PEFT would wrap in that base, with matching shapes: a key that matches
nothing, a targeted module without weights, or a shape from another base is an error, not a skip.
It needs only the factor shapes, so `load_adapter_for` runs it on the safetensors header and
reads no tensor of an adapter it refuses.

The PEFT format itself is `peft.py`. Writing adapters (normalized PEFT, SVD extraction, merging)
is `quadapt.converters`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, UnsupportedError
from ..model.lora import is_linear_like
from .peft import MAX_ADAPTER_BYTES, PeftAdapter, PeftHeader, read_peft_header, read_peft_weights
from .reader import CheckpointReader

_EMBEDDINGS = ("model.embed_tokens", "lm_head")
# PEFT's default target_modules for llama, mistral and qwen2 when a config leaves it unset
# (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class BaseModules:
    """The module layout of a base model.

    Attributes:
        names: every module name (HF naming), in model order.
        linear: name -> (out_features, in_features) for the linear-like modules, lm_head included.
        label: how messages name the base (its path).
    """

    names: list[str]
    linear: dict[str, tuple[int, int]]
    label: str

    @classmethod
    def of_model(cls, model: nn.Module, label: str = "the base model") -> BaseModules:
        """The layout of a built model (float or quantized linear modules alike); a stacked module
        (`qkv_proj`, see `fused.STACKED`) stands for its sections, by their HF names."""
        names, linear = [], {}
        for name, module in model.named_modules():
            if not name:
                continue
            sections = getattr(module, "section_names", ())
            if sections and is_linear_like(module):
                parent = name.rpartition(".")[0]
                for section, size in zip(sections, module.section_sizes):
                    names.append(f"{parent}.{section}" if parent else section)
                    linear[names[-1]] = (size, module.in_features)
                continue
            names.append(name)
            if is_linear_like(module):
                linear[name] = (module.out_features, module.in_features)
        return cls(names=names, linear=linear, label=label)

    @classmethod
    def of_config(cls, config: dict[str, Any], label: str) -> BaseModules:
        """The layout of the model a config.json describes, built on the meta device (no memory)."""
        from ..model.config import ModelConfig
        from ..model.model import CausalLM

        with torch.device("meta"):
            model = CausalLM(ModelConfig.from_dict(config))
        return cls.of_model(model, label)

    @classmethod
    def of_checkpoint(cls, reader: CheckpointReader) -> BaseModules:
        return cls.of_config(reader.config_dict(), str(reader.path))

    def projection_names(self) -> list[str]:
        """The linear layers LoRA may target: all but lm_head."""
        return [n for n in self.linear if n not in _EMBEDDINGS]


def check_adapter_fits(adapter: PeftAdapter | PeftHeader, base: BaseModules, *, max_rank: int | None = None) -> None:
    """Check that PEFT would apply `adapter` to `base` exactly as its weights say; only the
    config and the factor shapes are looked at, so a `PeftHeader` is checked before its tensors are read.

    Args:
        adapter: the adapter, or its header.
        base: the base model's module layout.
        max_rank: the largest rank the engine's adapter slots hold; None for no limit.

    Raises:
        AdapterError: a weight for a module the base lacks or that the config does not target, a
            targeted module without weights, a target_modules entry that selects nothing, a
            shape that does not fit (an adapter for another base), or a rank above `max_rank`.
        UnsupportedError: LoRA on lm_head or the embedding, or a target that is not a linear layer.
    """
    where = adapter.name
    shapes = adapter.shapes
    names = set(base.names)
    alien = [m for m in shapes if m not in names]
    if alien:
        raise AdapterError(
            f"adapter {where} has weights for {_listing(alien)}, which {base.label} lacks; it was trained "
            f"for another base model (the base has "
            f"{_layer_count(base)} layers and modules like {base.projection_names()[0]!r}). Use the base it was made for"
        )
    targets = peft_targets(adapter.config, base.names, base.linear)
    for name in targets + list(shapes):
        if name in _EMBEDDINGS:
            raise UnsupportedError(
                f"adapter {where} targets {name!r}: LoRA on the embedding or lm_head is not supported; quadapt "
                "applies LoRA to the attention and MLP projections only. Retrain without it in target_modules"
            )
        if name not in base.linear:
            raise UnsupportedError(
                f"adapter {where} targets {name!r}, which is not a linear layer in {base.label}; target_modules "
                f"may select linear projections only (e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in base.projection_names()}))})"
            )
    _check_target_entries(adapter, base)
    untargeted = [m for m in shapes if m not in set(targets)]
    if untargeted:
        raise AdapterError(
            f"adapter {where} has weights for {_listing(untargeted)}, which its target_modules "
            f"({adapter.config.get('target_modules')!r}, with exclude_modules/layers_to_transform) does not select; "
            "PEFT would ignore them. Fix target_modules in adapter_config.json"
        )
    empty = [t for t in targets if t not in shapes]
    if empty:
        raise AdapterError(
            f"adapter {where}: target_modules selects {_listing(empty)} but the adapter holds no LoRA "
            f"weights for it; PEFT would leave them at their initial values. The weights file is "
            "incomplete or the config belongs to another adapter"
        )
    for name, (a, b) in shapes.items():
        out_f, in_f = base.linear[name]
        if (b[0], a[1]) != (out_f, in_f):
            raise AdapterError(
                f"adapter {where}: module {name!r} has lora_A {a} and lora_B {b}, "
                f"a delta of shape [{b[0]}, {a[1]}], but in {base.label} that layer is "
                f"[{out_f}, {in_f}]; the adapter was trained for another base model. Use the base it was made for"
            )
    if max_rank is not None:
        rank, name = max((a[0], name) for name, (a, _) in shapes.items())
        if rank > max_rank:
            raise AdapterError(
                f"adapter {where} has rank {rank}, above the slots' max rank {max_rank} (module {name!r}); "
                "start the engine with a larger max_lora_rank"
            )


def peft_targets(config: Mapping[str, Any], module_names: Collection[str], linear_names: Collection[str]) -> list[str]:
    """The modules PEFT would wrap with LoRA in a base with these module names.

    Mirrors `peft.tuners.tuners_utils.check_target_module_exists` for what quadapt supports:
    target_modules as a list (exact name or `.name` suffix), a regex string (full match) or
    "all-linear" (every linear layer but lm_head), minus exclude_modules, limited to
    layers_to_transform (the first `<layers_pattern>.<idx>.` in the name).

    Args:
        config: the adapter config.
        module_names: every module name of the base (HF names, the root's "" excluded).
        linear_names: the linear ones among them, including lm_head.

    Returns:
        The targeted module names, in `module_names` order.
    """
    target = config.get("target_modules")
    if target is None:
        target = list(DEFAULT_TARGET_MODULES)
    if isinstance(target, str) and target.lower() == "all-linear":
        target = [n for n in linear_names if n != "lm_head"]
    exclude = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    patterns = config.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns]

    def excluded(key: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, key) is not None
        return key in exclude or any(key.endswith(f".{e}") for e in exclude)

    def layer_index(key: str) -> int | None:
        if not patterns:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            m = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        return int(m["idx"]) if m else None

    found = []
    for key in module_names:
        if excluded(key):
            continue
        if isinstance(target, str):
            hit = re.fullmatch(target, key) is not None
        else:
            hit = key in target or any(key.endswith(f".{t}") for t in target)
            if hit and layers and key not in target:  # peft skips the layer filter for exact names
                hit = layer_index(key) in layers
        if hit:
            found.append(key)
    return found


def load_adapter_for(
    adapter_dir: str | Path, base: BaseModules, *, max_rank: int | None = None, max_bytes: int = MAX_ADAPTER_BYTES
) -> PeftAdapter:
    """Read a PEFT adapter checked against `base`: its size, config and shapes first, from the
    safetensors header, and its tensors only once those pass.

    Args:
        adapter_dir: a PEFT adapter directory.
        base: the base model's module layout.
        max_rank: the largest rank the engine's adapter slots hold; None for no limit.
        max_bytes: the largest weights file read.

    Raises:
        AdapterError, UnsupportedError: see `read_peft_header`, `check_adapter_fits` and `read_peft_weights`.
    """
    header = read_peft_header(adapter_dir, max_bytes=max_bytes)
    check_adapter_fits(header, base, max_rank=max_rank)
    return read_peft_weights(header)


def _check_target_entries(adapter: PeftAdapter | PeftHeader, base: BaseModules) -> None:
    """Each target_modules list entry must select some module of the base: a typo is an error."""
    target = adapter.config.get("target_modules")
    if not isinstance(target, list):
        return
    for entry in target:
        if not any(n == entry or n.endswith(f".{entry}") for n in base.names):
            raise AdapterError(
                f"adapter {adapter.name}: target_modules entry {entry!r} matches no module of {base.label}; "
                f"its linear layers are named {', '.join(sorted({n.rsplit('.', 1)[-1] for n in base.linear}))}. "
                "The adapter was made for another architecture, or the entry is a typo"
            )


def _layer_count(base: BaseModules) -> int:
    return sum(1 for n in base.names if n.count(".") == 2 and n.startswith("model.layers."))


def _listing(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
