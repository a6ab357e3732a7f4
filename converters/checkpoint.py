"""What every checkpoint reader offers, and the one function that picks a reader for a path.

A reader streams tensors under their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`),
so the loader and every converter see one naming, whatever the file format. It does not build
models or quantize anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..runtime.errors import CheckpointError


@dataclass
class TokenizerFiles:
    """The tokenizer of a checkpoint, as the HF files hold it.

    Attributes:
        tokenizer_json: the text of a `tokenizer.json` (the `tokenizers` library's format).
        tokenizer_config: the dict of `tokenizer_config.json` (chat_template, bos/eos/pad tokens,
            add_bos_token, ...); may be empty.
        generation_config: the dict of `generation_config.json` (eos_token_id, ...); may be empty.
    """

    tokenizer_json: str
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)


class CheckpointReader(Protocol):
    """A model checkpoint opened for streaming reads."""

    path: Path

    def config_dict(self) -> dict[str, Any]:
        """The model's HF `config.json` as a dict."""
        ...

    def keys(self) -> list[str]:
        """Every tensor name, HF naming, in file order."""
        ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` one at a time, in `keys()` order, dequantized to float."""
        ...

    def tokenizer_files(self) -> TokenizerFiles | None:
        """The checkpoint's tokenizer, or None when it carries none."""
        ...


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint directory (HF safetensors) or a `.gguf` file.

    Raises:
        CheckpointError: the path does not exist, or is neither a directory nor a GGUF file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {str(path)!r} does not exist; pass a checkpoint directory or a .gguf file")
    if path.is_dir():
        from .hf import HFCheckpoint

        return HFCheckpoint(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    raise CheckpointError(
        f"model path {str(path)!r} is a file but not a .gguf; pass a checkpoint directory "
        "(config.json + *.safetensors) or a .gguf file"
    )
