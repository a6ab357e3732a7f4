"""Quantized-weight and LoRA ops, each with a Triton kernel and a torch reference of the same name.

Call the ops from here: each call goes to Triton for CUDA tensors and to `kernels.reference`
otherwise. The environment variable `QUADAPT_KERNELS` overrides that choice:

- `auto` (default): Triton on CUDA when the `triton` package is installed, the reference elsewhere;
- `triton`: always Triton; on CPU tensors this needs `TRITON_INTERPRET=1` (Triton's interpreter,
  slow but exact: how the kernels are tested without a GPU);
- `reference`: always the torch reference.

Importing this package imports neither Triton nor a device: the kernel modules load on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from ..runtime.errors import UnsupportedError
from . import reference

BACKENDS = ("auto", "triton", "reference")
_KERNEL_MODULES = {
    "qmatmul_packed_int": "qmatmul",
    "qmatmul_nf4": "qmatmul",
    "dequant_packed_int": "dequant",
    "dequant_nf4": "dequant",
    "add_lora": "lora",
}


def backend_setting() -> str:
    """The `QUADAPT_KERNELS` setting, checked.

    Raises:
        UnsupportedError: a value other than auto, triton, reference.
    """
    choice = os.environ.get("QUADAPT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise UnsupportedError(f"QUADAPT_KERNELS={choice!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    return choice


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors on `device` runs the Triton kernel.

    Raises:
        UnsupportedError: Triton was asked for but cannot run here.
    """
    choice = backend_setting()
    if choice == "reference":
        return False
    if choice == "auto":
        return device.type == "cuda" and _triton_installed()
    if not _triton_installed():
        raise UnsupportedError("QUADAPT_KERNELS=triton needs the triton package; install it with: pip install 'quadapt[gpu]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise UnsupportedError(
            f"QUADAPT_KERNELS=triton on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "(or use QUADAPT_KERNELS=reference)"
        )
    return True


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel_module(op: str) -> ModuleType:
    return importlib.import_module(f".{_KERNEL_MODULES[op]}", __name__)


def _dispatch(op: str, device: torch.device, *args: Any, **kwargs: Any) -> Any:
    impl = getattr(_kernel_module(op), op) if use_triton(device) else getattr(reference, op)
    return impl(*args, **kwargs)


def qmatmul_packed_int(x, weight_packed, weight_scale, weight_zero_point, bias, *, num_bits, in_features):
    """x @ W.T + bias for a compressed-tensors packed int4/int8 weight (`reference.qmatmul_packed_int`)."""
    return _dispatch(
        "qmatmul_packed_int", x.device, x, weight_packed, weight_scale, weight_zero_point, bias,
        num_bits=num_bits, in_features=in_features,
    )


def qmatmul_nf4(x, weight_packed, absmax, bias, *, shape, blocksize, dtype):
    """x @ W.T + bias for a bitsandbytes NF4 weight (`reference.qmatmul_nf4`)."""
    return _dispatch(
        "qmatmul_nf4", x.device, x, weight_packed, absmax, bias, shape=shape, blocksize=blocksize, dtype=dtype
    )


def dequant_packed_int(weight_packed, weight_scale, weight_zero_point, *, num_bits, in_features):
    """W [N, K] of a compressed-tensors packed int4/int8 weight (`reference.dequant_packed_int`)."""
    return _dispatch(
        "dequant_packed_int", weight_packed.device, weight_packed, weight_scale, weight_zero_point,
        num_bits=num_bits, in_features=in_features,
    )


def dequant_nf4(weight_packed, absmax, *, shape, blocksize, dtype):
    """W [N, K] of a bitsandbytes NF4 weight (`reference.dequant_nf4`)."""
    return _dispatch("dequant_nf4", weight_packed.device, weight_packed, absmax, shape=shape, blocksize=blocksize, dtype=dtype)


def add_lora(y, x, lora_a, lora_b, token_slots):
    """y + (x @ A[s].T) @ B[s].T per row, s its slot, -1 for none (`reference.add_lora`)."""
    return _dispatch("add_lora", x.device, y, x, lora_a, lora_b, token_slots)
