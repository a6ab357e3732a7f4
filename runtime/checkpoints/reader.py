"""What every checkpoint reader offers: the `CheckpointReader` interface and `TokenizerFiles`.

A reader streams tensors under their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`),
so the loader and every converter see one naming, whatever the file format. It does not build
models or quantize anything. Picking a reader for a path is `open_checkpoint` (the package's
`__init__`). `read_tokenizer_files` reads the HF tokenizer files of a directory (a checkpoint's
or an ONNX export's). This file imports no torch (only an annotation names it), so the tokenizer
and the edge runtime reach it where torch is not installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..model.config import read_json_object
from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch


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


# Entries some exporters save that are derived state, not weights (rotary inverse frequencies):
# every reader's consumer passes over them.
_DERIVED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_derived_key(name: str) -> bool:
    """Whether checkpoint entry `name` is derived state (`...rotary_emb.inv_freq`), not a weight."""
    return _DERIVED_KEY.search(name) is not None


def read_tokenizer_files(path: Path) -> TokenizerFiles | None:
    """The tokenizer files of an HF directory, or None when it has no `tokenizer.json`.

    A `chat_template.jinja` beside them takes priority over tokenizer_config's template, as in
    transformers.

    Raises:
        CheckpointError: a JSON file is not valid JSON or not an object.
    """
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        return None
    tokenizer_config = _read_json_or_empty(path / "tokenizer_config.json")
    template = path / "chat_template.jinja"
    if template.is_file():
        tokenizer_config["chat_template"] = template.read_text(encoding="utf-8")
    return TokenizerFiles(
        tokenizer_json=tokenizer.read_text(encoding="utf-8"),
        tokenizer_config=tokenizer_config,
        generation_config=_read_json_or_empty(path / "generation_config.json"),
    )


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    return read_json_object(path, CheckpointError, "; restore the file from the model repo")
