"""Quantized-weight and LoRA ops, each with a Triton kernel and a torch reference of the same name.

Call the ops from here: each call goes to Triton for CUDA tensors and to `kernels.reference`
otherwise. The environment variable `QUADAPT_KERNELS` overrides that choice:

- `auto` (default): Triton on CUDA when the `triton` package is installed; elsewhere the CPU
  implementation of an op where there is one (`kernels.cpu`), else the reference;
- `triton`: always Triton; on CPU tensors this needs `TRITON_INTERPRET=1` (Triton's interpreter,
  slow but exact: how the kernels are tested without a GPU);
- `reference`: always the torch reference.

`qlinear` and `dequant_weight` take a weight in the kernels' layout (`kernels/layout.py`), which the
runtime's quantized modules repack to at load when they run on Triton; `qlinear` dispatches by
the number of rows (`kernels/matmul.py`). `add_lora_` adds into its output in place.

`lora_linear` has no Triton kernel: its layout (a float base weight stored above the A stack) is
the CPU's (`runtime/model/lora.py`), so under `triton` it runs the reference.

The runtime resolves the backend once, when it loads a model (`resolve_backend`), and passes it
to every op (`backend=`); an op called without one resolves it from the environment on each call.

This package imports nothing else of quadapt: it is the bottom layer. Importing it imports
neither Triton nor a device: the kernel modules load on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Literal

import torch

from . import reference
from .layout import KernelWeight
from .reference import NO_SLOT

__all__ = [
    "BACKENDS", "NO_SLOT", "Backend", "KernelBackendError", "KernelWeight", "add_lora", "add_lora_", "backend_setting",
    "dequant_nf4", "dequant_packed_int", "dequant_weight", "lora_linear", "qlinear", "qmatmul_nf4", "qmatmul_packed_int",
    "reference", "resolve_backend", "use_triton",
]

Backend = Literal["triton", "cpu", "reference"]
BACKENDS = ("auto", "triton", "reference")
_KERNEL_MODULES = {
    "qmatmul_packed_int": "qmatmul",
    "qmatmul_nf4": "qmatmul",
    "dequant_packed_int": "dequant",
    "dequant_nf4": "dequant",
    "add_lora": "lora",
    "add_lora_": "lora",
    "qlinear": "matmul",
    "dequant_weight": "unpack",
}
_CPU_OPS = {"add_lora", "lora_linear"}  # the ops `kernels.cpu` implements


class KernelBackendError(ValueError):
    """A `QUADAPT_KERNELS` value that names no backend, or a backend that cannot run here."""


def backend_setting() -> str:
    """The `QUADAPT_KERNELS` setting, checked.

    Raises:
        KernelBackendError: a value other than auto, triton, reference.
    """
    choice = os.environ.get("QUADAPT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise KernelBackendError(f"QUADAPT_KERNELS={choice!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    return choice


def resolve_backend(device: torch.device | str, setting: str | None = None) -> Backend:
    """The backend that runs the ops on tensors on `device`.

    Args:
        device: where the tensors live.
        setting: auto, triton or reference; None reads `QUADAPT_KERNELS` (default auto).

    Returns:
        "triton", "cpu" (the CPU implementations where they exist, the references elsewhere)
        or "reference".

    Raises:
        KernelBackendError: an unknown setting, or Triton asked for where it cannot run.
    """
    device = torch.device(device)
    choice = backend_setting() if setting is None else setting
    if choice not in BACKENDS:
        raise KernelBackendError(f"kernel backend {choice!r} is not one; use one of {', '.join(BACKENDS)}")
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if device.type == "cuda" and _triton_installed():
            return "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if not _triton_installed():
        raise KernelBackendError("QUADAPT_KERNELS=triton needs the triton package; install it with: pip install 'quadapt[gpu]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise KernelBackendError(
            f"QUADAPT_KERNELS=triton on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "(or use QUADAPT_KERNELS=reference)"
        )
    return "triton"


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors on `device` runs the Triton kernel under the current environment.

    Raises:
        KernelBackendError: as `resolve_backend`.
    """
    return resolve_backend(device) == "triton"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel_module(op: str) -> ModuleType:
    return importlib.import_module(f".{_KERNEL_MODULES[op]}", __name__)


def _dispatch(op: str, device: torch.device, backend: Backend | None, *args: Any, **kwargs: Any) -> Any:
    if backend is None:
        backend = resolve_backend(device)
    if backend == "triton" and op in _KERNEL_MODULES:
        impl = getattr(_kernel_module(op), op)
    elif backend == "cpu" and op in _CPU_OPS:
        impl = getattr(importlib.import_module(".cpu", __name__), op)
    else:
        impl = getattr(reference, op)
    return impl(*args, **kwargs)


def qmatmul_packed_int(x, weight_packed, weight_scale, weight_zero_point, bias, *, num_bits, in_features, backend=None):
    """x @ W.T + bias for a compressed-tensors packed int4/int8 weight (`reference.qmatmul_packed_int`)."""
    return _dispatch(
        "qmatmul_packed_int", x.device, backend, x, weight_packed, weight_scale, weight_zero_point, bias,
        num_bits=num_bits, in_features=in_features,
    )


def qmatmul_nf4(x, weight_packed, absmax, bias, *, shape, blocksize, dtype, backend=None):
    """x @ W.T + bias for a bitsandbytes NF4 weight (`reference.qmatmul_nf4`)."""
    return _dispatch(
        "qmatmul_nf4", x.device, backend, x, weight_packed, absmax, bias, shape=shape, blocksize=blocksize, dtype=dtype
    )


def dequant_packed_int(weight_packed, weight_scale, weight_zero_point, *, num_bits, in_features, backend=None):
    """W [N, K] of a compressed-tensors packed int4/int8 weight (`reference.dequant_packed_int`)."""
    return _dispatch(
        "dequant_packed_int", weight_packed.device, backend, weight_packed, weight_scale, weight_zero_point,
        num_bits=num_bits, in_features=in_features,
    )


def dequant_nf4(weight_packed, absmax, *, shape, blocksize, dtype, backend=None):
    """W [N, K] of a bitsandbytes NF4 weight (`reference.dequant_nf4`)."""
    return _dispatch(
        "dequant_nf4", weight_packed.device, backend, weight_packed, absmax, shape=shape, blocksize=blocksize, dtype=dtype
    )


def qlinear(x, weight, bias, *, backend=None):
    """x @ W.T + bias for a weight in the kernels' layout, a `KernelWeight` (`reference.qlinear`)."""
    return _dispatch("qlinear", x.device, backend, x, weight, bias)


def dequant_weight(weight, *, backend=None):
    """W [N, K] of a weight in the kernels' layout (`reference.dequant_weight`)."""
    return _dispatch("dequant_weight", weight.words.device, backend, weight)


def add_lora_(y, x, lora_a, lora_b, token_slots, *, backend=None):
    """`add_lora` into y in place; returns y (`reference.add_lora_`)."""
    return _dispatch("add_lora_", x.device, backend, y, x, lora_a, lora_b, token_slots)


def add_lora(y, x, lora_a, lora_b, token_slots, *, backend=None):
    """y + (x @ A[s].T) @ B[s].T per row, s its slot, `NO_SLOT` for none (`reference.add_lora`)."""
    return _dispatch("add_lora", x.device, backend, y, x, lora_a, lora_b, token_slots)


def lora_linear(x, weight_and_a, bias, lora_b, token_slots, *, backend=None):
    """x @ W.T + bias plus each row's LoRA, W stored above the A stack (`reference.lora_linear`)."""
    return _dispatch("lora_linear", x.device, backend, x, weight_and_a, bias, lora_b, token_slots)
