"""What every checkpoint reader offers: the `CheckpointReader` interface and `TokenizerFiles`.

A reader streams tensors under their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`),
so the loader and every converter see one naming, whatever the file format. It does not build
models or quantize anything. Picking a reader for a path is `open_checkpoint` (the package's
`__init__`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
