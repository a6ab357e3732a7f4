"""quadapt: a deployment runtime for quantized, LoRA-adapted language models.

The public API is small: `load` a checkpoint (optionally with a LoRA adapter) and call
`generate` on what it returns::

    import quadapt
    print(quadapt.load("smollm2").generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32))

or `serve` it with named adapters to run many prompts at once, each with its own adapter and
`SamplingParams` (`BatchModel.generate`, `BatchModel.stream` for asyncio)::

    model = quadapt.serve("smollm2", adapters={"fr": "adapters/fr"})
    print([c.text for c in model.generate(["Hi!", "Salut !"], adapter=[None, "fr"])])

It lives in `runtime/api.py` and `runtime/batch_api.py` and is imported on first use, so importing this package loads
nothing heavy (no torch). The parts are subpackages: `runtime` (checkpoint readers, model,
loader, generation), `converters` (quantized checkpoints and adapters out), `kernels`, `protos`,
`train`.
"""

from __future__ import annotations

from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

__version__ = _version("quadapt")  # one source: pyproject.toml

__all__ = ["BatchModel", "LoadedModel", "SamplingParams", "__version__", "load", "serve"]

if TYPE_CHECKING:
    from .runtime.api import LoadedModel, load
    from .runtime.batch_api import BatchModel, serve
    from .runtime.sampling import SamplingParams

# Public name -> the module that defines it.
_LAZY = {
    "load": "api", "LoadedModel": "api", "serve": "batch_api", "BatchModel": "batch_api", "SamplingParams": "sampling",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the API (and torch behind it) is imported when first asked for, not with the package.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".runtime.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
