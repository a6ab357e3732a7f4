"""Progress on stderr for long tensor-by-tensor work (conversion, fetching), via tqdm."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int, label: str) -> Iterator[T]:
    """Pass `items` through unchanged, drawing a progress bar of `total` tensors on stderr."""
    yield from tqdm(items, total=total, desc=f"quadapt: {label}", unit="tensor", file=sys.stderr, mininterval=0.5)
