"""Reader of Hugging Face checkpoint directories: config.json plus single or sharded safetensors.

Headers are checked when the directory is opened (a truncated or corrupt file is reported then,
not midway through a load); tensors are then memory-mapped and streamed one at a time. Pickle
checkpoints (`pytorch_model.bin`) are refused, never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..runtime.config import read_config_json
from ..runtime.errors import CheckpointError
from .checkpoint import TokenizerFiles

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpoint:
    """An HF checkpoint directory opened for streaming reads.

    Raises:
        CheckpointError: no config.json, no safetensors weights, a bad index, or a shard whose
            header is truncated or corrupt.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._config = read_config_json(self.path)
        self._shards = self._find_shards()  # shard file -> its tensor names, in file order
        self._check_index_matches()

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def keys(self) -> list[str]:
        return [name for names in self._shards.values() for name in names]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard, names in self._shards.items():
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {str(shard)!r}: {e}; the file is damaged, download it again") from None

    def tokenizer_files(self) -> TokenizerFiles | None:
        return read_tokenizer_files(self.path)

    def _find_shards(self) -> dict[Path, list[str]]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{str(index)!r} is not a valid safetensors index (needs 'weight_map'): {e}") from None
            files = sorted({self.path / f for f in weight_map.values()})
        elif (self.path / SINGLE_FILE).is_file():
            files, weight_map = [self.path / SINGLE_FILE], None
        else:
            files, weight_map = sorted(self.path.glob("*.safetensors")), None
        if not files:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = (
                f" It holds {', '.join(pickles)}: pickle files, which quadapt never loads; convert them to "
                "safetensors with transformers' save_pretrained(safe_serialization=True)."
                if pickles
                else ""
            )
            raise CheckpointError(f"{str(self.path)!r} holds no *.safetensors weights.{hint}")
        shards = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"the index lists {file.name!r}, which is missing from {str(self.path)!r}")
            try:
                with safe_open(file, framework="pt") as f:
                    shards[file] = list(f.keys())
            except SafetensorError as e:
                raise CheckpointError(
                    f"{str(file)!r} is not a readable safetensors file ({e}); it is truncated or corrupt, "
                    "download or convert it again"
                ) from None
        self._weight_map = weight_map
        return shards

    def _check_index_matches(self) -> None:
        if self._weight_map is None:
            return
        for name, file in self._weight_map.items():
            if name not in self._shards[self.path / file]:
                raise CheckpointError(f"the index puts {name!r} in {file!r}, but that shard does not hold it")


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}; restore the file from the model repo") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data
