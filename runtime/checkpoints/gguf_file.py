"""The GGUF container: header, metadata and tensor table, parsed from an mmap.

This reads llama.cpp's file layout only (little-endian v2/v3: magic, counts, key/value pairs,
tensor infos, aligned data) and checks each tensor lies inside the file. It is parsed here rather
than by the `gguf` package's reader, which walks every vocabulary string through numpy and takes
seconds to open a file. Names, model config and dequantization live in `gguf.py`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, QuadaptError, UnsupportedError

# ggml type id -> (name, elements per block, bytes per block), for the types quadapt dequantizes.
SUPPORTED_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
SUPPORTED_NAMES = ", ".join(name for name, _, _ in SUPPORTED_TYPES.values())

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's entry in the header."""

    name: str
    shape: tuple[int, ...]  # torch order, e.g. [out, in]
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorEntry]]:
    """Parse a GGUF header: its metadata and tensor table, checked against the file size.

    Raises:
        CheckpointError: not GGUF, truncated, or corrupt.
        UnsupportedError: a GGUF version or byte order quadapt does not read.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        if file.read(4) != _MAGIC:
            raise CheckpointError(
                f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); pass a .gguf file from llama.cpp"
            )
        if size < 24:
            raise CheckpointError(f"GGUF file {str(path)!r} is truncated ({size} bytes); download or convert it again")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                return _parse(blob, size, path)
            except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as error:
                if isinstance(error, QuadaptError):
                    raise
                raise CheckpointError(
                    f"GGUF file {str(path)!r} is truncated or corrupt ({type(error).__name__}: {error}); "
                    "download or convert it again"
                ) from error


def _parse(blob: mmap.mmap, size: int, path: Path) -> tuple[dict[str, Any], list[TensorEntry]]:
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        hint = "big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version}"
        raise UnsupportedError(
            f"{str(path)!r} is {hint}; quadapt reads little-endian GGUF v2 and v3; re-convert with a current llama.cpp"
        )
    reader = _Reader(blob)
    reader.pos = 24
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar("<I"))
    entries = []
    for _ in range(tensor_count):
        name = reader.string()
        n_dims = reader.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise CheckpointError(
                f"GGUF file {str(path)!r}: tensor {name!r} has {n_dims} dimensions; the file is corrupt"
            )
        dims = struct.unpack_from(f"<{n_dims}Q", blob, reader.pos)
        reader.pos += 8 * n_dims
        ggml_type, offset = reader.scalar("<I"), reader.scalar("<Q")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))  # ggml lists the fastest dim first

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise CheckpointError(f"GGUF file {str(path)!r} states alignment {alignment!r}; the file is corrupt")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in entries:
        nbytes = 0
        if ggml_type in SUPPORTED_TYPES:
            _, block, block_bytes = SUPPORTED_TYPES[ggml_type]
            if shape[-1] % block != 0:
                raise CheckpointError(
                    f"GGUF file {str(path)!r}: tensor {name!r} rows of {shape[-1]} do not fill "
                    f"{block}-element blocks; the file is corrupt"
                )
            nbytes = math.prod(shape) // block * block_bytes
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(
                f"GGUF file {str(path)!r} is truncated: tensor {name!r} ends at byte {start + nbytes} but the file "
                f"has {size}; download or convert it again"
            )
        tensors.append(TensorEntry(name, shape, ggml_type, start, nbytes))
    return metadata, tensors


class _Reader:
    """A cursor over the header bytes; every read advances it."""

    def __init__(self, blob: mmap.mmap):
        self.blob, self.pos = blob, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.blob[self.pos : self.pos + length]
        if len(raw) != length:
            raise ValueError(f"string of {length} bytes runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALARS:  # numbers in bulk: token types and scores run to 100k+ entries
            fmt = _SCALARS[item_type]
            width = struct.calcsize(fmt)
            raw = self.blob[self.pos : self.pos + count * width]
            if len(raw) != count * width:
                raise ValueError(f"array of {count} values runs past the end of the file")
            self.pos += count * width
            return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
        return [self.value(item_type) for _ in range(count)]
