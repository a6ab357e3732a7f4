"""Helpers shared by the Triton kernels and their launchers.

Triton's CPU interpreter (triton 3.9) differs from a GPU in two ways the kernels must work around
to be tested exactly on CPU: it computes `tl.dot` on two bf16 tiles wrongly, and it casts fp32 to
bf16 by truncation instead of round-to-nearest-even. Launchers pass `interpreting()` to their
kernels, which then upcast bf16 tiles before a dot and round bf16 casts by hand (`cast`); on a GPU
both stay native.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def cast(x, DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr):
    """`x.to(DTYPE)`, rounding to nearest even by hand for bf16 when EXACT_BF16 (interpreter only)."""
    if EXACT_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
