"""Launch configurations of `kernels.matmul`: the defaults, and the tuned winners per GPU.

A configuration (`Config`) names the path the M dispatch takes (split-K GEMV, split-K `tl.dot`
tiles, or dequantize-to-scratch and a float matmul) and its tiling. Winners are keyed on the
problem (`tuning_key`: M bucket, N, K, group size, bits, zero points, format, activation dtype)
and kept per GPU name in `kernels/tuned/<gpu>.json`, read when this module is imported (a file
read; no device is queried until a kernel runs). `python -m quadapt.kernels.tune` regenerates a
GPU's file on that GPU; nothing tunes while serving: a problem without an entry gets `default_config`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
KernelPath = Literal["gemv", "dot", "dequant"]
GEMV_MAX_ROWS = 4  # the GEMV keeps one accumulator row per input row
PATHS = ("gemv", "dot", "dequant")


@dataclass(frozen=True)
class Config:
    """How one call runs: the path, its tile, K splits, and Triton's warps and stages."""

    path: KernelPath
    block_m: int = 1
    block_n: int = 64
    block_k: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path {self.path!r} is not one of {', '.join(PATHS)}")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be at least 1")


def m_bucket(M: int) -> int:
    """The M bucket a tuned entry covers: M itself up to the GEMV's rows, then powers of two (capped at 512)."""
    if M <= GEMV_MAX_ROWS:
        return M
    return min(512, 1 << (M - 1).bit_length())


def tuning_key(M: int, N: int, K: int, *, group_size: int, num_bits: int, has_zero: bool, fmt: int,
               dtype: torch.dtype) -> str:
    """The key of a problem in a tuned table."""
    kind = "nf4" if fmt else f"int{num_bits}"
    return f"m{m_bucket(M)}-n{N}-k{K}-g{group_size}-{kind}-z{int(has_zero)}-{str(dtype).removeprefix('torch.')}"


def default_config(M: int, N: int, K: int, multiprocessors: int) -> Config:
    """The configuration of a problem without a tuned entry.

    Up to 4 rows: the GEMV; up to 64: 16- to 64-row `tl.dot` tiles; both split K so the grid
    fills the device twice over (never a split shorter than one K block). Above: dequantize and
    a float matmul (vLLM's choice for AWQ from 256 tokens; the GEMM tiles lose to cuBLAS there).
    """
    if M > 64:
        return Config("dequant", block_n=64, block_k=32)
    if M <= GEMV_MAX_ROWS:
        block_m, block_n, block_k = 1 << (M - 1).bit_length(), 128, 32
    else:
        block_m, block_n, block_k = min(64, max(16, 1 << (M - 1).bit_length())), 64, 64
    tiles = -(-M // block_m) * -(-N // block_n)
    split_k = max(1, min(-(-2 * multiprocessors // tiles), -(-K // block_k)))
    return Config("gemv" if M <= GEMV_MAX_ROWS else "dot", block_m, block_n, block_k, split_k)


def gpu_slug(name: str) -> str:
    """A GPU's name as a file name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_tables(directory: Path = TUNED_DIR) -> dict[str, dict[str, Config]]:
    """Every tuned table in `directory`, by GPU slug.

    Raises:
        ValueError: a file that is not a table of configurations (names the file).
    """
    tables: dict[str, dict[str, Config]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            entries = json.loads(path.read_text())["configs"]
            tables[path.stem] = {key: Config(**value) for key, value in entries.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a tuned table of kernel configurations ({e}); regenerate it with "
                             "python -m quadapt.kernels.tune") from None
    return tables


def table_json(gpu: str, configs: dict[str, Config]) -> str:
    """A tuned table's file contents."""
    return json.dumps({"gpu": gpu, "configs": {k: asdict(v) for k, v in sorted(configs.items())}}, indent=1) + "\n"


TABLES = load_tables()


@functools.cache
def _device_table(device: torch.device) -> dict[str, Config]:
    return TABLES.get(gpu_slug(torch.cuda.get_device_name(device)), {})


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def config_for(key: str, M: int, N: int, K: int, device: torch.device) -> Config:
    """The tuned configuration of `key` on `device`'s GPU, else the default."""
    if device.type == "cuda":
        tuned = _device_table(device).get(key)
        if tuned is not None:
            return tuned
    return default_config(M, N, K, multiprocessors(device))
