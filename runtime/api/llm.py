"""`quadapt.LLM`: a checkpoint behind the batching engine, many requests at once, synchronously.

`LLM("smollm2", adapters={...})` builds the engine through `EngineArgs`/`build_engine` (the one
way every front door builds one); `LLM.from_engine(engine, tokenizer)` wraps an engine already
built (the gRPC server does). `generate` runs a list of prompts to completion in the calling
thread, each with its own adapter (or none) and sampling settings; `stream` yields their text
deltas as the engine steps. Adapters load, unload and list here, also between calls.

For asyncio and streaming beside other requests, `async_llm.AsyncLLM` steps the engine in a
background thread. Requests, outputs and the text made from token ids live in `outputs.py`;
this file owns no thread and holds no text logic of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .front import EngineFront
from .outputs import Completion, GenerateRequest, TextDelta, completion_of, requests_of
from ..text.sampling_params import SamplingParams

__all__ = ["LLM", "GenerateRequest", "TextDelta", "Completion", "serve"]


class LLM(EngineFront):
    """Many requests at once over one batching engine, synchronously; see the module docstring.

    Args:
        model: a checkpoint directory or `.gguf` file (it must carry a tokenizer).
        **options: the engine's options, `EngineArgs`' fields: `adapters` (name -> PEFT adapter
            directory, loaded at start), `dtype`, `device`, `threads`, `kv_cache_bytes`,
            `block_size`, `max_num_seqs`, `max_num_batched_tokens`, `max_loras` (adapter slots;
            0 serves the base model only), `max_lora_rank`; each with `EngineArgs`' default.

    Raises:
        CheckpointError, ConfigError, UnsupportedError: a checkpoint quadapt cannot serve.
        AdapterError, UnsupportedError: a start-up adapter that is malformed or does not fit
            (checked before the weights load).
        InvalidParameterError: an unknown or out-of-range option.

    Attributes: `engine`, `tokenizer` and `path`, as `EngineFront`'s; `from_engine(engine,
    tokenizer)` wraps an engine already built.
    """

    # -- requests -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> list[Completion]:
        """Generate for every prompt at once, greedily unless told otherwise.

        Args:
            prompts: a list of prompts, each raw text (encoded with the tokenizer's special
                tokens) or chat messages (`[{"role": ..., "content": ...}]`, through the chat
                template); a lone string or conversation is a list of one. Or a list of
                `GenerateRequest`s, which carry their own settings and adapter.
            params: sampling settings for every prompt, or a list with one per prompt; instead
                of `settings`.
            adapter: the name of a loaded adapter for every prompt, or a list with one name (or
                None, the base model) per prompt.
            chat: None follows each prompt's type; True wraps every string as one user message
                (as `quadapt generate --chat`); False with messages is an error.
            **settings: sampling keywords for every prompt (`max_new_tokens`, `temperature`,
                `top_k`, `top_p`, `repetition_penalty`, `seed`, `stop`, `ignore_eos`, `logprobs`),
                with `SamplingParams`' defaults.

        Returns:
            One `Completion` per prompt, in order: `.text` (what `quadapt.load(...).generate`
            gives that prompt alone), `.finish_reason` ("stop", "length", or "error" with
            `.error` saying why), `.context_full`, `.stop_reason`, `.prompt_tokens`,
            `.completion_tokens`, and `.logprobs` when asked (`TokenLogprob`s, one per token
            whose text is in `.text`).

        Raises:
            InvalidParameterError: a malformed prompt, lists not aligned with the prompts, an
                unknown keyword or a setting outside its range, or `params` with `settings`.
            AdapterNotFoundError: an adapter name that is not loaded (never the base model instead).
            ContextLengthError: a prompt that fills the model's context.
            Nothing runs unless every request is valid.
        """
        ids = self._add_all(requests_of(prompts, params, adapter, chat, settings))
        parts: dict[str, list[TextDelta]] = {rid: [] for rid in ids}
        while self.engine.has_unfinished():
            for delta in self.step():
                if delta.request_id in parts:  # requests queued with `add` stream to their own caller
                    parts[delta.request_id].append(delta)
        return [completion_of(rid, parts[rid]) for rid in ids]

    def stream(
        self,
        prompts: Any,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> Iterator[TextDelta]:
        """Queue the requests as `generate` does and yield their text deltas as the engine steps,
        until all have finished.

        Raises:
            As `generate`, before any request runs.
        """
        self._add_all(requests_of(prompts, params, adapter, chat, settings))
        while self.engine.has_unfinished():
            yield from self.step()

    def add(self, request: GenerateRequest) -> str:
        """Queue one request; returns its id (its deltas come from `step`).

        Raises:
            InvalidParameterError, ContextLengthError, AdapterNotFoundError: see `Engine.add_request`.
        """
        context = self.engine.executor.config.max_position_embeddings
        ids = self.tokenizer.encode_prompt(request.prompt, max_tokens=context)
        rid = request.request_id if request.request_id is not None else f"gen-{next(self._ids)}"
        rid = self.engine.add_request(ids, request.params, adapter=request.adapter, request_id=rid)
        self._outputs.add(rid, request.params)
        return rid

    def step(self) -> list[TextDelta]:
        """One engine step; the text deltas of the requests it advanced (empty when none is queued)."""
        return self._outputs.process(self.engine.step())

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def abort(self, request_id: str) -> bool:
        """Cancel a request queued with `add`; its cache blocks are freed. False if unknown or finished."""
        self._outputs.discard(request_id)
        return self.engine.abort(request_id)

    def _add_all(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Queue every request, or none: one that fails takes back those queued before it."""
        added: list[str] = []
        try:
            for request in requests:
                added.append(self.add(request))
        except Exception:
            for rid in added:
                self.abort(rid)
            raise
        return added

    # -- adapters (loading and listing are EngineFront's) -----------------------------------------------------------------

    def unload_adapter(self, name: str) -> None:
        """Forget the adapter `name`.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterInUseError: unfinished requests use it.
        """
        self.engine.adapters.unload(name)

    def close(self) -> None:
        """Cancel every request still queued (their cache blocks are freed); the model stays usable."""
        for request_id in self.engine.request_ids():
            self.abort(request_id)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(path: str | Path, **options: Any) -> LLM:
    """Deprecated: `quadapt.LLM(path, **options)`, which it returns (streaming is `quadapt.AsyncLLM`).
    It goes in the next release."""
    warnings.warn(
        "quadapt.serve(...) is deprecated and goes in the next release; use quadapt.LLM(...), which takes the same "
        "arguments (and quadapt.AsyncLLM(...) to stream)",
        DeprecationWarning,
        stacklevel=2,
    )
    return LLM(path, **options)

