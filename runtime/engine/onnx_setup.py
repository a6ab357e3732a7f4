"""Choosing the executor (`EngineArgs.executor`) and finding or building the ONNX executor's export.

`choose_executor` turns "auto" | "torch" | "onnx" into the executor to build ("auto": the ONNX
executor for a packed checkpoint on the CPU, the torch executor elsewhere), refusing "onnx"
where it cannot run with an error that says what to do instead. `serving_export` returns the
serving export of a checkpoint for given slot settings: cached beside the checkpoint (or in the
user's cache directory when that is not writable) under a hash of the checkpoint's bytes and the
settings, so it is built once per checkpoint and built again when the checkpoint changes.

The export is built by the converters, a layer above the runtime: they register their builder
here (`set_serving_exporter`; the public API, `quadapt.LLM` and its siblings, and the command line
do it), so this room never imports them. This module imports no torch and no onnxruntime at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError, UnsupportedError

logger = logging.getLogger(__name__)

EXECUTORS = ("auto", "torch", "onnx")
# The serving export's manifest: its file name, format and version. A new version is a new graph
# (its cache key includes the version, so an engine of this version builds its own export).
SERVING_FORMAT = "quadapt-onnx-serving"
SERVING_VERSION = 3
SERVING_MANIFEST = "quadapt_serving.json"
# What the ONNX executor's export is built with; part of the cache key.
EXPORT_SETTINGS = {"lm_head": "int8", "accuracy_level": 4, "block_size": 32}
_INSTALL = "pip install 'quadapt[onnx]'"
_UNREGISTERED = (
    "the ONNX executor's export builder is not registered: it is registered by the public API (quadapt.LLM, "
    "quadapt.AsyncLLM, quadapt.load) and the command line; when building an engine from quadapt.runtime "
    "directly, call quadapt._register_serving_exporter() first"
)

# (checkpoint, out_dir, *, num_slots, max_rank, bits, block_size, lm_head, accuracy_level) -> out_dir
ServingExporter = Callable[..., Path]
_exporter: ServingExporter | None = None


def set_serving_exporter(exporter: ServingExporter) -> None:
    """Register what builds a serving export (`converters.onnx_serving.export_serving`)."""
    global _exporter
    _exporter = exporter


def onnx_available() -> bool:
    """Whether the `onnx` extra (onnxruntime and onnx) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def packed_bits(config: dict[str, Any], keys: list[str]) -> int | None:
    """The bits of a checkpoint's packed int linears (compressed-tensors pack-quantized, 4 or 8;
    the more common where both occur), or None when it has none."""
    from ..checkpoints.quantized import PackedIntSpec, quantized_linears

    names = [k.removesuffix(".weight_packed") for k in keys if k.endswith(".weight_packed")]
    if not names or not isinstance(config.get("quantization_config"), dict):
        return None
    bits = [s.num_bits for s in quantized_linears(config, names).values() if isinstance(s, PackedIntSpec)]
    return max(set(bits), key=bits.count) if bits else None


def choose_executor(executor: str, device: str, bits: int | None, model: str, dtype: str = "float32") -> str:
    """The executor to build: "torch" or "onnx".

    "auto" is "onnx" where it runs and pays: on the CPU, for a packed int4/int8 checkpoint, in
    float32, with the `onnx` extra installed and the export builder registered (the weights stay
    packed, and decode runs at onnxruntime's speed; `docs/engine.md`). Anywhere else it is "torch":
    on CUDA, for float or GGUF checkpoints, in bfloat16/float16. The choice is logged (debug).

    Raises:
        InvalidParameterError: an unknown executor name.
        UnsupportedError: "onnx" on a device other than the CPU, without the onnx extra, or on a
            checkpoint that is not packed int4/int8.
    """
    if executor not in EXECUTORS:
        raise InvalidParameterError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "auto":
        why = _torch_reason(device, bits, dtype)
        logger.debug("executor auto: %s", f"torch ({why})" if why else "onnx (packed weights on the CPU)")
        return "torch" if why else "onnx"
    if executor != "onnx":
        return "torch"
    if device != "cpu":
        raise UnsupportedError(
            f"the ONNX executor runs on the CPU, but device {device!r} was asked for; use --executor torch "
            f"(executor='torch') on {device}"
        )
    if not onnx_available():
        raise UnsupportedError(f"the ONNX executor needs onnxruntime and onnx; install them with: {_INSTALL}")
    if bits is None:
        raise UnsupportedError(
            f"the ONNX executor serves packed int4/int8 checkpoints, and {model!r} is not one; quantize it first "
            f"(quadapt convert --model {model} --out MODEL-int4 --scheme int4), or use --executor torch"
        )
    if _exporter is None:
        raise UnsupportedError(_UNREGISTERED)
    return "onnx"


def _torch_reason(device: str, bits: int | None, dtype: str) -> str | None:
    """Why "auto" builds the torch executor here, or None where it builds the ONNX one."""
    if device != "cpu":
        return f"device {device}"
    if bits is None:
        return "the checkpoint is not packed int4/int8"
    if dtype != "float32":
        return f"dtype {dtype}; the ONNX executor computes in float32"
    if not onnx_available():
        return f"the onnx extra is not installed ({_INSTALL})"
    if _exporter is None:
        return "no serving export builder is registered"
    return None


def serving_export(checkpoint: Path, *, num_slots: int, max_rank: int, bits: int) -> Path:
    """The serving export of `checkpoint` for these slots: the cached one, or one built now.

    Raises:
        UnsupportedError: no builder is registered.
        Whatever the builder raises for a checkpoint it cannot export.
    """
    settings = {**EXPORT_SETTINGS, "num_slots": num_slots, "max_rank": max_rank, "bits": bits}
    key = _content_hash(checkpoint, {**settings, "version": SERVING_VERSION})
    name = f"onnx-serving-{key[:16]}"
    home = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidates = [home / ".quadapt" / name, _user_cache() / name]
    for path in candidates:
        if (path / SERVING_MANIFEST).is_file():
            return path
    if _exporter is None:
        raise UnsupportedError(_UNREGISTERED)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path.parent, os.W_OK):
            with _exclusive(path.parent / f".{name}.lock"):  # engines starting together build it once
                if (path / SERVING_MANIFEST).is_file():
                    return path
                return _exporter(checkpoint, path, overwrite=True, **settings)
    raise InvalidParameterError(
        f"no writable place for the ONNX export of {checkpoint}: neither {candidates[0].parent} nor "
        f"{candidates[1].parent} can be written; make one of them writable (or set XDG_CACHE_HOME)"
    )


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (POSIX `flock`; no lock where there is none):
    replicas of a server started at once on one machine build a checkpoint's export one at a time,
    and those after the first find it built."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quadapt"


def _content_hash(checkpoint: Path, settings: dict[str, Any]) -> str:
    """sha256 over the settings and every file of the checkpoint (its hidden entries aside), name and bytes."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    files = [checkpoint] if checkpoint.is_file() else sorted(
        p for p in checkpoint.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(checkpoint).parts)
    )
    for file in files:
        name = file.name if file == checkpoint else file.relative_to(checkpoint).as_posix()
        h.update(f"{name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
