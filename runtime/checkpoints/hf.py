"""Reader of Hugging Face checkpoint directories: config.json plus single or sharded safetensors.

Headers are checked when the directory is opened (a truncated or corrupt file is reported then,
not midway through a load); tensors are then streamed one at a time with plain reads into fresh
buffers (`SafetensorsFile`), not memory-mapped, so a pass over a model holds one tensor, not the
file's pages. Pickle checkpoints (`pytorch_model.bin`) are refused, never loaded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..model.config import read_config_json
from ..errors import CheckpointError
from .reader import TokenizerFiles, read_tokenizer_files

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
    "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """Random access to one safetensors file's tensors by plain reads (no memory map).

    A memory-mapped file's pages count in the reader's resident memory as they are touched, so a
    pass over a whole model through `safe_open` ends up holding the whole file; reading each
    tensor into its own buffer holds only what the caller keeps.

    Raises:
        CheckpointError: the header cannot be parsed, or a tensor's bytes are missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the safetensors header of {str(path)!r}: {e}; the file is damaged") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, dict[str, Any]] = header

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, in a buffer of its own."""
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{name!r} in {str(self.path)!r} has dtype {entry['dtype']}, which quadapt does not read")
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view, got = memoryview(buffer.numpy()), 0
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            while got < len(view):  # one read call returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != end - start:
            raise CheckpointError(f"{str(self.path)!r} ends inside {name!r}; the file is truncated, download it again")
        return buffer.view(dtype).reshape(entry["shape"])


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

    @property
    def shards(self) -> dict[Path, list[str]]:
        """Each shard file and the tensor names it holds, in file order."""
        return dict(self._shards)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard, names in self._shards.items():
            file = SafetensorsFile(shard)
            for name in names:
                yield name, file.read(name)

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
