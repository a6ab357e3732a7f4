"""quadapt: a deployment runtime for quantized, LoRA-adapted language models.

The public API is small. `load` a checkpoint (optionally with a LoRA adapter) and call
`generate` on what it returns, one request at a time::

    import quadapt
    print(quadapt.load("smollm2").generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32))

`LLM` puts a checkpoint behind the batching engine with named adapters, to run many prompts at
once, each with its own adapter and `SamplingParams`; `AsyncLLM` streams each request to asyncio,
batched with every other. Both load, unload and list adapters while they run::

    llm = quadapt.LLM("smollm2", adapters={"fr": "adapters/fr"})
    print([c.text for c in llm.generate(["Hi!", "Salut !"], adapter=[None, "fr"])])

`serve` is a deprecated alias of `LLM` (it warns, and goes in the next release).

They live in `runtime/api/load.py`, `runtime/api/llm.py` and `runtime/api/async_llm.py` and are imported on
first use, so importing this package loads nothing heavy (no torch). The parts are subpackages:
`runtime` (checkpoint readers, model, loader, engine, generation), `converters` (quantized
checkpoints and adapters out), `kernels`, `protos`, `train`.
"""

from __future__ import annotations

from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

__version__ = _version("quadapt")  # one source: pyproject.toml

__all__ = ["LLM", "AsyncLLM", "LoadedModel", "SamplingParams", "__version__", "load", "serve"]

if TYPE_CHECKING:
    from .runtime.api.load import LoadedModel, load
    from .runtime.api.async_llm import AsyncLLM
    from .runtime.api.llm import LLM, serve
    from .runtime.text.sampling_params import SamplingParams

# Public name -> the module that defines it.
_LAZY = {
    "load": "api.load", "LoadedModel": "api.load", "LLM": "api.llm", "AsyncLLM": "api.async_llm", "serve": "api.llm",
    "SamplingParams": "text.sampling_params",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the API (and torch behind it) is imported when first asked for, not with the package.
    if name in _LAZY:
        from importlib import import_module

        _register_serving_exporter()
        return getattr(import_module(f".runtime.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_serving_exporter() -> None:
    """Let the engine's ONNX executor build its export: the converters are a layer above the
    runtime, so the public API and the command line hand it their builder (imported only when an
    export is built, so onnx stays optional)."""
    from .runtime.engine.onnx_setup import set_serving_exporter

    set_serving_exporter(_export_serving)


def _export_serving(*args: Any, **kwargs: Any) -> Any:
    from .converters.onnx_serving import export_serving

    return export_serving(*args, **kwargs)
