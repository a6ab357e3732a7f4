"""Writing a float checkpoint directory in Hugging Face layout, atomically and streaming.

`write_checkpoint` lays out what `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` read: `config.json`, `model.safetensors` (or numbered shards
with `model.safetensors.index.json`), and the tokenizer files. It builds everything in a hidden
sibling directory and renames it into place only at the end, so an interrupted run leaves nothing
under the final name, and it holds at most one shard of tensors in memory.

It does not convert, quantize or validate weights against the config; a reader (`gguf.py`, `hf.py`)
supplies them under HF names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import CheckpointError, QuadaptError
from .checkpoint import TokenizerFiles

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB" as HF counts it
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
            f"output directory {str(out_dir)!r} already exists; pass --overwrite (overwrite=True) to replace it, "
            "or choose another path"
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

    Returns:
        `out_dir`.

    Raises:
        QuadaptError: `out_dir` exists and `overwrite` is False, or is a file.
        CheckpointError: a tensor name repeats, an item is not a tensor, or there are no tensors.
    """
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    if max_shard_bytes <= 0:
        raise QuadaptError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem; hidden, so tools skip it.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_weights(
            staging, tensors, skip_lm_head=bool(config.get("tie_word_embeddings")), max_shard_bytes=max_shard_bytes
        )
        _write_json(staging / "config.json", config)
        if tokenizer is not None:
            (staging / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
            _write_json(staging / "tokenizer_config.json", tokenizer.tokenizer_config)
            if tokenizer.generation_config:
                _write_json(staging / "generation_config.json", tokenizer.generation_config)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_weights(
    staging: Path, tensors: Iterable[tuple[str, torch.Tensor]], *, skip_lm_head: bool, max_shard_bytes: int
) -> None:
    """Write shards as tensors arrive; name them once their count is known, and index them if several."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes = 0, 0
    shard_files: list[Path] = []
    shard_of: dict[str, int] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = staging / f"shard-{len(shard_files):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        shard_files.append(path)
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint item {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in shard_of:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint stream; each name must be unique")
        if skip_lm_head and name == "lm_head.weight":
            continue  # tied: transformers rebuilds it from the embedding
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().to("cpu").contiguous()
        shard_of[name] = len(shard_files)
        shard_bytes += nbytes
        total_bytes += nbytes
    if not shard_of:
        raise CheckpointError("the checkpoint stream held no tensors; nothing to write")
    if shard:
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


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished directory to `out_dir`, replacing an old one only after the new one is whole."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
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
