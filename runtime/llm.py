"""Text around the engine: prompts and chat messages in, text out, for many requests at once.

`OutputProcessor` turns the engine's token ids into text deltas, one `TextStream` per request,
and ends a request at its first stop string (the engine sees ids only, so stop strings are
settled here and the request is aborted in the engine). `LLM.generate` runs a list of requests
to completion, synchronously; `AsyncLLM` steps the engine in a background thread and streams
each request's deltas to an asyncio consumer, cancelling the request (its cache blocks freed at
once) when the consumer stops listening.

Tokenization and chat templates live here, at the edge; nothing in this file samples or
schedules.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, RequestOutput
from .errors import InvalidParameterError
from .metrics import MetricsSnapshot
from .sampling import SamplingParams
from .text_stream import TextStream
from .tokenizer import Tokenizer

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class GenerateRequest:
    """One request for `LLM.generate`.

    Attributes:
        prompt: raw text (the tokenizer's special tokens added), or chat messages
            (`[{"role": ..., "content": ...}]`, rendered by the chat template).
        params: sampling settings and stop conditions.
        adapter: the name of a loaded adapter, or None for the base model.
        request_id: a unique id; None makes one.
    """

    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class TextDelta:
    """New text of one request, and how it ended once it has.

    Attributes:
        request_id: the request.
        text: text released this step ("" while held back, e.g. a possible stop string).
        token_ids: tokens produced this step.
        finished: the request is over.
        finish_reason: "stop", "length" or "abort" once finished.
        stop_reason: the eos/stop token id or the stop string that ended it, else None.
        prompt_tokens, completion_tokens: usage so far.
        context_full: it ended because the model's context was full.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    context_full: bool = False


@dataclass
class Completion:
    """A finished request: the whole text and how it ended (fields as in `TextDelta`)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    context_full: bool = False


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's usual special tokens) or of chat messages
    (through the chat template, which writes its own special tokens).

    Raises:
        InvalidParameterError: messages that are not a list of role/content objects, or text
            that is not a string.
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    raise InvalidParameterError(
        f"a prompt is a string, or a non-empty list of messages like {{'role': 'user', 'content': '...'}}; "
        f"got {str(prompt)[:80]!r}"
    )


class OutputProcessor:
    """Per-request text streams over an engine's outputs; ends requests at their stop strings."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._streams: dict[str, TextStream] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)

    def discard(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def process(self, outputs: Sequence[RequestOutput]) -> list[TextDelta]:
        """Text deltas for one step's outputs; a request whose text completes a stop string is
        aborted in the engine and reported finished with that string as its stop reason."""
        deltas = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            text, stop = "", None
            for token in out.new_token_ids:
                piece, stop = stream.feed(token)
                text += piece
                if stop is not None:
                    break
            if stop is None and out.finished:
                piece, stop = stream.finish()
                text += piece
            finished, reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
            if stop is not None:
                if not out.finished:
                    self.engine.abort(out.request_id)
                finished, reason, stop_reason = True, "stop", stop
            if finished:
                del self._streams[out.request_id]
            deltas.append(TextDelta(
                out.request_id, text, list(out.new_token_ids), finished, reason, stop_reason,
                out.prompt_tokens, out.completion_tokens, out.context_full and stop is None,
            ))
        return deltas


class LLM:
    """Many requests at once over one engine, synchronously.

    Args:
        engine: the engine (see `Engine.for_model`).
        tokenizer: the model's tokenizer.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._outputs = OutputProcessor(engine, tokenizer)
        self._ids = itertools.count()

    def add(self, request: GenerateRequest) -> str:
        """Queue one request; returns its id.

        Raises:
            InvalidParameterError, ContextLengthError, AdapterNotFoundError: see `Engine.add_request`.
        """
        ids = encode_prompt(self.tokenizer, request.prompt)
        rid = request.request_id if request.request_id is not None else f"gen-{next(self._ids)}"
        rid = self.engine.add_request(ids, request.params, adapter=request.adapter, request_id=rid)
        self._outputs.add(rid, request.params)
        return rid

    def step(self) -> list[TextDelta]:
        """One engine step; the text deltas of the requests it advanced (empty when none is queued)."""
        return self._outputs.process(self.engine.step())

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stream(self, requests: Sequence[GenerateRequest]) -> Iterator[TextDelta]:
        """Queue `requests` and yield text deltas as the engine steps, until all have finished.

        Raises:
            As `add`, before any request runs: every request is checked first.
        """
        self._add_all(requests)
        while self.engine.has_unfinished():
            yield from self.step()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        """Run `requests` to completion; returns one `Completion` each, in the order given.

        Raises:
            As `add`, before any request runs.
        """
        ids = self._add_all(requests)
        parts: dict[str, list[TextDelta]] = {rid: [] for rid in ids}
        while self.engine.has_unfinished():
            for delta in self.step():
                if delta.request_id in parts:  # requests queued with `add` stream to their own caller
                    parts[delta.request_id].append(delta)
        return [_completion(rid, parts[rid]) for rid in ids]

    def _add_all(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Queue every request, or none: one that fails takes back those queued before it."""
        added: list[str] = []
        try:
            for request in requests:
                added.append(self.add(request))
        except Exception:
            for rid in added:
                self.engine.abort(rid)
                self._outputs.discard(rid)
            raise
        return added


def _completion(rid: str, deltas: list[TextDelta]) -> Completion:
    last = deltas[-1]
    return Completion(
        rid, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], last.finish_reason,
        last.stop_reason, last.prompt_tokens, last.completion_tokens, last.context_full,
    )


class AsyncLLM:
    """The engine stepped by a background thread, each request streamed to an asyncio consumer.

    Start it with `start()` (or `async with`), stop it with `shutdown()`. `stream(...)` is an
    async iterator of a request's `TextDelta`s; leaving it early (break, cancellation, a client
    gone) aborts the request, which frees its cache blocks at once.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._outputs = OutputProcessor(engine, tokenizer)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="quadapt-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def __aenter__(self) -> AsyncLLM:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)

    async def stream(
        self, prompt: Prompt, params: SamplingParams, *, adapter: str | None = None, request_id: str | None = None
    ) -> AsyncIterator[TextDelta]:
        """Generate for one request, yielding its text deltas; the last has `finished` True.

        Raises:
            InvalidParameterError, ContextLengthError, AdapterNotFoundError: before anything runs.
        """
        ids = encode_prompt(self.tokenizer, prompt)
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        # The engine's lock is held through a step: take it on a worker thread, never on the event loop.
        rid = await asyncio.to_thread(self._add, ids, params, adapter, rid, asyncio.get_running_loop(), queue)
        finished = False
        try:
            while True:
                delta: TextDelta = await queue.get()
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                # Synchronously, so the blocks are free when the stream is closed (a closing
                # generator may not get another turn of the loop); this waits out at most the
                # step in progress.
                self.abort(rid)

    def _add(
        self, ids: list[int], params: SamplingParams, adapter: str | None, rid: str,
        loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
    ) -> str:
        with self._wake:
            rid = self.engine.add_request(ids, params, adapter=adapter, request_id=rid)
            self._outputs.add(rid, params)
            self._queues[rid] = (loop, queue)
            self._wake.notify()
            return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed before this returns (at most one step's wait)."""
        with self._wake:
            self._queues.pop(request_id, None)
            self._outputs.discard(request_id)
            return self.engine.abort(request_id)

    def metrics(self) -> MetricsSnapshot:
        """The engine's metrics, read between steps (the engine thread changes its queues)."""
        with self._wake:
            return self.engine.metrics()

    def load_adapter(self, name: str, path: str) -> None:
        """Load (or reload) an adapter while requests run."""
        if self.engine.adapters is None:
            raise InvalidParameterError("this engine serves no adapters; start it with max_loras >= 1")
        self.engine.adapters.load(name, path)  # the registry has its own lock; file reading happens outside ours

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    return
                deltas = self._outputs.process(self.engine.step())
                for delta in deltas:
                    target = self._queues.get(delta.request_id)
                    if delta.finished:
                        self._queues.pop(delta.request_id, None)
                    if target is not None:
                        loop, queue = target
                        loop.call_soon_threadsafe(queue.put_nowait, delta)
