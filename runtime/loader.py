"""Build a model from a checkpoint: construct on the meta device, then stream tensors into it.

Loading is strict: every parameter must come from the checkpoint with the right shape, and every
checkpoint tensor must find a parameter; both lists are reported in full otherwise. Format
details (HF directories, GGUF) stay in the readers of `converters/`; this file sees HF names only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..converters.checkpoint import CheckpointReader, open_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .model import CausalLM

# Checkpoint entries that are derived state in some exporters, not weights: safe to pass over.
_DERIVED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def load_model(
    source: str | Path | CheckpointReader,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> CausalLM:
    """Load a Llama-family model from a checkpoint directory or a `.gguf` file.

    Args:
        source: a checkpoint path, or a reader already opened on one.
        dtype: dtype of the parameters.
        device: where the parameters live.

    Returns:
        The model in eval mode, its parameters frozen.

    Raises:
        CheckpointError: missing or unexpected tensors, wrong shapes, unreadable files.
        ConfigError, UnsupportedError: a config quadapt cannot run.
    """
    reader = source if not isinstance(source, (str, Path)) else open_checkpoint(source)
    config = ModelConfig.from_dict(reader.config_dict())
    with torch.device("meta"):
        model = CausalLM(config)

    expected = _expected_shapes(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in reader.tensors():
        if name not in expected:
            tied_head = name == "lm_head.weight" and config.tie_word_embeddings
            if not (tied_head or _DERIVED.search(name)):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{reader.path}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{expected[name]}; the weights and config.json belong to different models"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{reader.path}: tensor {name!r} has dtype {tensor.dtype}; float weights expected")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)

    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise CheckpointError(_key_report(reader.path, missing, unexpected))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    # named_parameters() lists a tied weight once, under its first name (the embedding).
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)


def _key_report(path: Path, missing: list[str], unexpected: list[str], shown: int = 12) -> str:
    def listing(names: list[str]) -> str:
        more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = [f"{path}: the checkpoint does not match the model config.json describes."]
    if missing:
        parts.append(f"Missing {len(missing)} tensor(s): {listing(missing)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} tensor(s): {listing(unexpected)}.")
    parts.append("Check that config.json and the weights come from the same model.")
    return " ".join(parts)
