"""`quadapt.serve`: a checkpoint behind the batching engine, for many requests at once.

`serve` loads the model for the engine (`engine.py`, with `llm.py`'s text around it) and the
named adapters; `BatchModel.generate` runs a list of prompts together, each with its own
adapter (or none) and sampling settings, and `BatchModel.stream` streams one request to
asyncio. Each prompt's text is what `load(path, adapter=...).generate(prompt)` gives. It is not
a network server (that is `server.py`) and holds no policy beyond turning keywords into requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .api import DType, Message, check_threads, resolve_dtype, sampling_params, text_or_messages
from .engine import Engine
from .engine_args import EngineArgs, build_engine
from .errors import InvalidParameterError
from .llm import LLM, AsyncLLM, Completion, GenerateRequest, TextDelta
from .metrics import MetricsSnapshot
from .registry import AdapterRegistry
from .sampling import SamplingParams
from .tokenizer import Tokenizer


class BatchModel:
    """A model behind the batching engine: many requests at once, each with its own adapter and
    sampling settings; made by `serve`.

    `generate` runs a list of prompts to completion in the calling thread; `stream` streams one
    request to asyncio while an engine thread steps every open stream together. The two take
    turns (the engine is stepped by one thread at a time): `generate` refuses to start while a
    stream is open, and a stream waits for a running `generate` to return. `close` (or leaving
    `with`) stops the engine thread.

    Attributes:
        engine: the engine (see `engine.py`); `engine.adapters` is its adapter registry.
        tokenizer: the checkpoint's tokenizer and chat template.
        path: the checkpoint it was loaded from.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, path: Path) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.path = path
        self._llm = LLM(engine, tokenizer)
        self._async: AsyncLLM | None = None  # started by the first stream, stopped by generate
        self._open_streams = 0
        self._turn = threading.Lock()  # held briefly, to hand the engine from one driver to the other
        self._generating = threading.Lock()  # held through a generate call

    def generate(
        self,
        prompts: str | Sequence[str | Sequence[Message]],
        *,
        adapter: str | Sequence[str | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> list[Completion]:
        """Generate for every prompt at once, greedily unless told otherwise.

        Args:
            prompts: a list of prompts, each raw text or chat messages as in
                `LoadedModel.generate`; a lone string or conversation is a list of one.
            adapter: the name of a loaded adapter for every prompt, or a list with one name (or
                None, the base model) per prompt.
            params: sampling settings for every prompt, or a list with one per prompt; instead
                of `settings`.
            chat: as `LoadedModel.generate`, for every prompt.
            **settings: `LoadedModel.generate`'s sampling keywords (`max_new_tokens`,
                `temperature`, `top_k`, `top_p`, `repetition_penalty`, `seed`, `stop`,
                `ignore_eos`), for every prompt.

        Returns:
            One `Completion` per prompt, in order: `.text` (what `LoadedModel.generate` returns
            for it), `.finish_reason` ("stop" or "length"; `.context_full` when the model's
            context cut it short), `.stop_reason`, `.prompt_tokens`, `.completion_tokens`.

        Raises:
            InvalidParameterError: a malformed prompt, a list of adapters or params not aligned
                with the prompts, an unknown sampling keyword or a setting outside its range,
                `params` with `settings`, or streams open on this model.
            AdapterNotFoundError: an adapter name that is not loaded (never the base model instead).
            ContextLengthError: a prompt that fills the model's context.
            Nothing runs unless every request is valid.
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(m, Mapping) for m in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidParameterError(
                f"prompts must be a list of prompts (strings or message lists), got {prompts!r:.200}"
            )
        n = len(prompts)
        names = _per_prompt("adapter", adapter, n, "an adapter name or None", _is_adapter_name)
        sampling = _per_prompt("params", sampling_params(params, settings), n, "a SamplingParams", _is_params)
        requests = [GenerateRequest(text_or_messages(p, chat), s, a) for p, s, a in zip(prompts, sampling, names)]
        with self._generating:
            self._stop_streaming("generate")  # this thread alone steps the engine until it returns
            return self._llm.generate(requests)

    async def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> AsyncIterator[TextDelta]:
        """Generate for one request, yielding its text as it comes, batched with every other open
        stream. Leaving early cancels the request and frees its cache: at once when the consuming
        task is cancelled or the stream is closed (`contextlib.aclosing`), and after a bare
        `break` when the event loop next runs (Python closes an abandoned generator from there).

        Args:
            prompt, chat: as `LoadedModel.generate`.
            adapter: the name of a loaded adapter, or None for the base model.
            params, **settings: as `generate`, for this request.

        Yields:
            `TextDelta`s: `.text` is the new text (joined, the text `generate` gives); the last
            has `.finished` True, with `.finish_reason` and usage as `Completion`.

        Raises:
            As `generate`, when first iterated, before anything runs.
        """
        params = sampling_params(params, settings)
        if not _is_params(params):
            raise InvalidParameterError(f"params must be a SamplingParams, got {params!r:.200}")
        if not _is_adapter_name(adapter):
            raise InvalidParameterError(f"adapter must be an adapter name or None, got {adapter!r:.200}")
        request = text_or_messages(prompt, chat)
        while True:
            with self._turn:
                if not self._generating.locked():
                    if self._async is None:
                        self._async = AsyncLLM(self.engine, self.tokenizer)
                        self._async.start()
                    deltas = self._async.stream(request, params, adapter=adapter)
                    self._open_streams += 1  # from here on, generate refuses to start
                    break
            await asyncio.sleep(0.01)  # a generate call in another thread has the engine
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()  # aborts the request unless it finished
            with self._turn:
                self._open_streams -= 1

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load (or reload with new weights) a PEFT adapter under `name`, also while requests run;
        requests already admitted keep the weights they started with.

        Raises:
            InvalidParameterError: a bad name, or a model served with max_loras=0.
            AdapterError, UnsupportedError: the adapter is malformed, unsupported, made for
                another base, or of a rank above `max_lora_rank`.
        """
        self._registry().load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Forget the adapter `name`.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterInUseError: unfinished requests use it.
        """
        registry = self._registry()
        if self._async is not None:
            self._async.unload_adapter(name)  # after the aborts of streams closed before this call
        else:
            registry.unload(name)

    def adapters(self) -> list[str]:
        """The names of the loaded adapters, sorted."""
        return [] if self.engine.adapters is None else [v.name for v in self.engine.adapters.names()]

    def metrics(self) -> MetricsSnapshot:
        """The engine's queues, cache use, counters and latencies now (see `metrics.py`)."""
        streaming = self._async
        return streaming.metrics() if streaming is not None else self.engine.metrics()

    def close(self) -> None:
        """Stop the engine thread that streams run on, if one is running; the model stays usable.

        Raises:
            InvalidParameterError: streams are open (their requests would never finish).
        """
        self._stop_streaming("close")

    def __enter__(self) -> BatchModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_streaming(self, action: str) -> None:
        """Join the stream engine thread (idle once no stream is open), so the caller alone steps the engine."""
        with self._turn:
            if self._open_streams:
                raise InvalidParameterError(
                    f"{self._open_streams} stream(s) are open on this model; {action} waits for none to be. Finish or "
                    "close them first (a stream left early is closed when the event loop next runs, or at once "
                    "under contextlib.aclosing)"
                )
            if self._async is not None:
                self._async.shutdown()
                self._async = None

    def _registry(self) -> AdapterRegistry:
        if self.engine.adapters is None:
            raise InvalidParameterError(
                "this model was served with max_loras=0 (base model only); serve it with max_loras >= 1"
            )
        return self.engine.adapters


def serve(
    path: str | Path,
    *,
    adapters: Mapping[str, str | Path] | None = None,
    dtype: DType | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    max_num_seqs: int = EngineArgs.max_num_seqs,
    max_num_batched_tokens: int = EngineArgs.max_num_batched_tokens,
    max_loras: int | None = EngineArgs.max_loras,
    max_lora_rank: int | None = EngineArgs.max_lora_rank,
    kv_cache_bytes: int = EngineArgs.kv_cache_bytes,
) -> BatchModel:
    """Load a checkpoint behind the batching engine, with named adapters, to serve many requests.

    Args:
        path, dtype, device, threads: as `load` (on CPU, packed quantized weights are unpacked
            once, for speed).
        adapters: PEFT LoRA adapter directories by the name requests use (letters, digits,
            `._-/`); more can be loaded later with `BatchModel.load_adapter`.
        max_num_seqs: the most requests running at once (more wait their turn).
        max_num_batched_tokens: the most tokens one engine step feeds; longer prompts are
            prefilled in chunks.
        max_loras: distinct adapters one batch can use (more are loaded but wait for a slot);
            None: max(4, number of adapters); 0 serves the base model only.
        max_lora_rank: the largest adapter rank the slots hold; None: the largest rank among
            `adapters`, at least 16.
        kv_cache_bytes: memory for the paged KV cache (default 512 MiB).

    Returns:
        A `BatchModel`.

    Raises:
        CheckpointError, ConfigError, UnsupportedError: as `load`.
        AdapterError, UnsupportedError: an adapter is malformed, unsupported, or made for another
            base (checked before the weights load).
        InvalidParameterError: a bad dtype, threads, limit or adapter name, adapters with
            max_loras=0, or a cache budget that holds no block.
    """
    torch_dtype = resolve_dtype(dtype)
    check_threads(threads)
    if adapters is not None and not isinstance(adapters, Mapping):
        raise InvalidParameterError(
            f"adapters must map names to adapter directories, e.g. {{'fr': 'adapters/fr'}}; got {adapters!r:.200}"
        )
    args = EngineArgs(
        model=str(path), adapters=dict(adapters or {}), dtype=str(torch_dtype).removeprefix("torch."),
        device=str(device), threads=threads, kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_loras=max_loras, max_lora_rank=max_lora_rank,
    )
    engine, tokenizer, checkpoint = build_engine(args)
    return BatchModel(engine, tokenizer, checkpoint)


def _is_params(value: object) -> bool:
    return isinstance(value, SamplingParams)


def _is_adapter_name(value: object) -> bool:
    return value is None or isinstance(value, str)


def _per_prompt(name: str, value: Any, n: int, what: str, is_one: Callable[[Any], bool]) -> list[Any]:
    """`value` for each of `n` prompts: one value for all, or a list of `n`."""
    if is_one(value):
        return [value] * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(is_one(v) for v in value):
        return list(value)
    raise InvalidParameterError(f"{name} must be {what}, or a list of {n} of them (one per prompt); got {value!r:.200}")
