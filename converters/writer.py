"""Writing a float checkpoint directory in Hugging Face layout, atomically and streaming.

`write_checkpoint` lays out what `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` read: `config.json`, `model.safetensors` (or numbered shards
with `model.safetensors.index.json`), and the tokenizer files. It builds everything in a hidden
sibling directory and renames it into place only at the end, so an interrupted run leaves nothing
under the final name, and it holds no tensor in memory beyond the one being written: each shard's
data is spooled to disk as it arrives. The staging directory is private (0700) while it fills; the
finished one, and what it holds, get the modes the umask gives new directories and files.

It does not convert, quantize or validate weights against the config; a reader (`gguf.py`, `hf.py`)
supplies them under HF names. `staged_dir` is the same atomic write for any directory (adapters
use it too).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import CheckpointError, QuadaptError
from ..runtime.checkpoints import TokenizerFiles
from ..runtime.checkpoints.hf import INDEX_FILE, SINGLE_FILE
from ..runtime.files import current_umask  # noqa: F401 - also this module's name for it

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB" as HF counts it
# Suffixes of the hidden siblings of an output: being written, the old one being replaced, scratch.
_STAGING, _REPLACED, _SCRATCH = ".partial", ".old", ".scratch"

logger = logging.getLogger(__name__)


def check_output_dir(out_dir: str | Path, *, overwrite: bool) -> Path:
    """Check that a checkpoint may be written at `out_dir`, before any slow work starts.

    Args:
        out_dir: where the checkpoint directory is to go.
        overwrite: whether an existing directory there may be replaced.

    Returns:
        `out_dir` as an expanded Path.

    Raises:
        QuadaptError: `out_dir` is an existing file, or an existing directory and `overwrite` is False.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise QuadaptError(f"output path {str(out_dir)!r} is an existing file, not a directory; choose another path")
    if out_dir.exists() and not overwrite:
        raise QuadaptError(
            f"output directory {str(out_dir)!r} already exists; pass --overwrite to replace it (overwrite=True from "
            "Python), or choose another path"
        )
    return out_dir


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: TokenizerFiles | None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Callable[[], Mapping[str, str]] | None = None,
) -> Path:
    """Write an HF-layout checkpoint directory from a stream of named tensors.

    Args:
        out_dir: the directory to create.
        config: the `config.json` dict. When `tie_word_embeddings` is true, `lm_head.weight` is not written.
        tensors: `(hf_name, tensor)` pairs, consumed one at a time; tensors are written as their dtype.
        tokenizer: the tokenizer files to write beside the weights, or None for none.
        overwrite: replace an existing directory at `out_dir` (only once the new one is complete).
        max_shard_bytes: start a new safetensors shard before one would grow past this; a tensor
            larger than this gets a shard of its own.
        extra_files: called once the tensors are written (so it may report on them); returns
            further text files to put in the directory, file name -> content (e.g. a manifest).

    Returns:
        `out_dir`.

    Raises:
        QuadaptError: `out_dir` exists and `overwrite` is False, or is a file.
        CheckpointError: a tensor name repeats, an item is not a tensor, or there are no tensors.
    """
    if max_shard_bytes <= 0:
        raise QuadaptError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes}")
    with staged_dir(out_dir, overwrite=overwrite) as staging:
        _write_weights(
            staging, tensors, skip_lm_head=bool(config.get("tie_word_embeddings")), max_shard_bytes=max_shard_bytes
        )
        _write_json(staging / "config.json", config)
        if tokenizer is not None:
            (staging / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
            _write_json(staging / "tokenizer_config.json", tokenizer.tokenizer_config)
            if tokenizer.generation_config:
                _write_json(staging / "generation_config.json", tokenizer.generation_config)
        for name, text in (extra_files() if extra_files is not None else {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    return Path(out_dir).expanduser()


@contextmanager
def staged_dir(out_dir: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling directory to fill; renamed to `out_dir` when the block succeeds, removed otherwise.

    Its name carries this process's id, so a later run can tell the leftovers of a killed run
    (whose process is gone) from another run's work in progress: it removes the former and, if a
    run was killed while replacing `out_dir`, puts the previous checkpoint back first.

    Raises:
        QuadaptError: `out_dir` exists and `overwrite` is False, or is a file.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.parent.is_dir():
        _recover_abandoned(out_dir)  # first: a restored checkpoint is then guarded like any other
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem. mkdtemp makes it 0700, so no one else
    # reads a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out_dir), suffix=_STAGING, dir=out_dir.parent))
    try:
        yield staging
        _open_up(staging)
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def scratch_dir(out_dir: Path) -> tempfile.TemporaryDirectory[str]:
    """A temporary sibling of `out_dir` for bulky intermediate files, on the output's disk.

    Args:
        out_dir: the output directory it serves; its parent must exist.

    Returns:
        A context manager yielding the scratch path; it is removed on exit, or, if the process is
        killed, by the next write to `out_dir`.
    """
    return tempfile.TemporaryDirectory(prefix=_sibling_prefix(out_dir), suffix=_SCRATCH, dir=out_dir.parent)


def _sibling_prefix(out_dir: Path) -> str:
    # Hidden, so tools skip it; named after the output and this process, so `_recover_abandoned`
    # tells a killed run's leftovers (process gone) from another run's work in progress.
    return f".{out_dir.name}.{os.getpid()}."


def _open_up(staging: Path) -> None:
    """Give a finished staging directory, and everything in it, the modes the umask gives new ones.

    So other users (or a server running as another user) read it as the umask allows. mkdtemp made
    the directory 0700, and not every writer follows the umask: safetensors' `save_file` makes 0600.
    """
    mask = current_umask()
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)
        elif path.is_dir() and not path.is_symlink():
            path.chmod(0o777 & ~mask)
    staging.chmod(0o777 & ~mask)


def _recover_abandoned(out_dir: Path) -> None:
    """Remove the staging, scratch and replacement directories that killed runs left beside `out_dir`."""
    for path in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*")):
        pid = path.name[len(out_dir.name) + 2 :].split(".", 1)[0]
        if not path.is_dir() or path.suffix not in (_STAGING, _REPLACED, _SCRATCH) or not pid.isdigit() or _alive(int(pid)):
            continue
        previous = path / "previous"
        if path.suffix == _REPLACED and previous.is_dir() and not out_dir.exists():
            os.rename(previous, out_dir)  # killed between moving the old checkpoint out and the new one in
            logger.warning("restored %r, which an interrupted run had moved aside", str(out_dir))
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %r, left by an interrupted run", str(path))


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_weights(
    staging: Path, tensors: Iterable[tuple[str, torch.Tensor]], *, skip_lm_head: bool, max_shard_bytes: int
) -> None:
    """Write shards as tensors arrive; name them once their count is known, and index them if several."""
    shard: _ShardWriter | None = None
    total_bytes = 0
    shard_files: list[Path] = []
    shard_of: dict[str, int] = {}

    def flush() -> None:
        nonlocal shard
        assert shard is not None
        shard_files.append(shard.close())
        shard = None

    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint item {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in shard_of:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint stream; each name must be unique")
        if skip_lm_head and name == "lm_head.weight":
            continue  # tied: transformers rebuilds it from the embedding
        nbytes = tensor.numel() * tensor.element_size()
        if shard is not None and shard.nbytes + nbytes > max_shard_bytes:
            flush()
        if shard is None:
            shard = _ShardWriter(staging / f"shard-{len(shard_files):05d}.safetensors")
        shard.add(name, tensor)
        shard_of[name] = len(shard_files)
        total_bytes += nbytes
    if not shard_of:
        raise CheckpointError("the checkpoint stream held no tensors; nothing to write")
    if shard is not None:
        flush()

    if len(shard_files) == 1:
        os.replace(shard_files[0], staging / SINGLE_FILE)
        return
    count = len(shard_files)
    final = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for path, name in zip(shard_files, final):
        os.replace(path, staging / name)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {name: final[i] for name, i in shard_of.items()}}
    _write_json(staging / INDEX_FILE, index)


# torch dtype -> safetensors dtype name
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class _ShardWriter:
    """One safetensors file written as tensors arrive, holding none of them in memory.

    The format is an 8-byte little-endian header size, a JSON header (dtype, shape and byte range
    of each tensor, padded with spaces to 8 bytes), then the data with no gaps. The header comes
    first but is known only at the end, so data is spooled to scratch files beside the shard, one
    per element size, and `close` writes the header and then the scratch files largest element
    first: every tensor then starts at a multiple of its element size, as in safetensors' own files.
    (`safetensors.torch.save_file` would need the whole shard in memory, and copies it once more.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.nbytes = 0
        self._spools: dict[int, Any] = {}  # element size -> open scratch file
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}  # element size -> (name, dtype, shape, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.element_size()
        if size not in self._spools:
            self._spools[size] = open(self.path.with_name(f"{self.path.name}.{size}.spool"), "w+b")  # noqa: SIM115
            self._entries[size] = []
        # A uint8 view of the tensor's own memory: numpy hands it to write() without a copy.
        self._spools[size].write(tensor.reshape(-1).view(torch.uint8).numpy())
        nbytes = tensor.numel() * size
        self._entries[size].append((name, _SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), nbytes))
        self.nbytes += nbytes

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the finished file and remove the scratch files; return the file's path."""
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        sizes = sorted(self._spools, reverse=True)
        for size in sizes:
            for name, dtype, shape, nbytes in self._entries[size]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        with open(self.path, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for size in sizes:
                spool = self._spools[size]
                spool.seek(0)
                shutil.copyfileobj(spool, f, 1 << 24)
                spool.close()
                Path(spool.name).unlink()
        return self.path


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished directory to `out_dir`, replacing an old one only after the new one is whole."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out_dir), suffix=_REPLACED, dir=out_dir.parent))
    previous = trash / "previous"
    os.rename(out_dir, previous)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(previous, out_dir)  # put the old checkpoint back rather than lose both
        trash.rmdir()
        raise
    shutil.rmtree(trash)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
