"""What `LLM` and `AsyncLLM` share: one engine built one way, its tokenizer, and its adapters.

`EngineFront(model, **options)` builds the engine through `EngineArgs`/`build_engine`;
`from_engine` wraps one already built (the server does). Loading and listing adapters and
reading metrics are the same on both; how requests run (in the caller's thread, or in an
engine thread feeding asyncio) and how an adapter is unloaded (now, or between two steps) are
each subclass's own.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, TypeVar

from ..engine.args import args_from_options, build_engine
from ..engine.engine import Engine
from ..engine.metrics import MetricsSnapshot
from ..engine.registry import AdapterVersion
from ..text.tokenizer import Tokenizer
from .outputs import OutputProcessor

_Front = TypeVar("_Front", bound="EngineFront")


class EngineFront:
    """The engine, tokenizer and adapters of a front door (see the module docstring).

    Attributes:
        engine: the engine; `engine.adapters` is its adapter registry.
        tokenizer: the checkpoint's tokenizer and chat template.
        path: the checkpoint it was loaded from (None when wrapped with `from_engine`).
    """

    def __init__(self, model: str | Path, **options: Any) -> None:
        engine, tokenizer, path = build_engine(args_from_options(model, options))
        self._attach(engine, tokenizer, path)

    @classmethod
    def from_engine(cls: type[_Front], engine: Engine, tokenizer: Tokenizer, path: Path | None = None) -> _Front:
        """A front door over an engine already built (by `build_engine`), with the model's tokenizer."""
        front = cls.__new__(cls)
        front._attach(engine, tokenizer, path)
        return front

    def _attach(self, engine: Engine, tokenizer: Tokenizer, path: Path | None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.path = path
        self._outputs = OutputProcessor(engine, tokenizer)
        self._ids = itertools.count()

    def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterVersion:
        """Load (or reload with new weights) a PEFT adapter under `name`; requests already queued
        keep the weights they started with. It blocks while the files are read (the registry has
        its own lock, so requests go on): from an event loop, run it in a thread.

        Args:
            name: letters, digits and `._-/`, at most 128 characters.
            path: the adapter directory.
            pinned: keep it in a slot once it has one.

        Returns:
            Its current version (the same one when the weights are unchanged).

        Raises:
            InvalidParameterError: a bad name.
            NoAdapterSlotsError: the model was started with `max_loras=0`.
            AdapterError, UnsupportedError: the adapter is malformed, unsupported, made for
                another base, or of a rank above `max_lora_rank`.
        """
        return self.engine.adapters.load(name, path, pinned=pinned)

    def list_adapters(self) -> list[str]:
        """The names of the loaded adapters, sorted."""
        return [v.name for v in self.engine.adapters.names()]

    def adapter_versions(self) -> list[AdapterVersion]:
        """The loaded adapters' current versions (name, digest, rank, slot, users), by name."""
        return self.engine.adapters.names()

    def metrics(self) -> MetricsSnapshot:
        """The engine's queues, cache use, counters and latencies now (see `engine/metrics.py`)."""
        return self.engine.metrics()
