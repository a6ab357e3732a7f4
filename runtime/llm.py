"""Text around the engine: prompts and chat messages in, text out, for many requests at once.

`OutputProcessor` turns the engine's token ids into text deltas, one `TextStream` per request,
and ends a request at its first stop string (the engine sees ids only, so stop strings are
settled here and the request is aborted in the engine). `LLM.generate` runs a list of requests
to completion, synchronously; `AsyncLLM` steps the engine in a background thread and streams
each request's deltas to an asyncio consumer, cancelling the request (its cache blocks freed
before the engine's next step) when the consumer stops listening.

Tokenization and chat templates live here, at the edge; nothing in this file samples or
schedules. A prompt is checked against the model's context before it is tokenized, by its
length in characters, so that a huge prompt costs nothing to refuse; `AsyncLLM` tokenizes in a
worker thread, and never makes its event loop wait for the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, RequestOutput
from .errors import ContextLengthError, EngineDeadError, InvalidParameterError, RequestFailedError, quote
from .metrics import MetricsSnapshot
from .sampling import SamplingParams
from .text_stream import TextStream
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]

# The most chat messages one prompt may hold; a conversation longer than this is a client's bug or
# an attack, and rendering it would cost seconds.
MAX_MESSAGES = 1024


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
        finish_reason: "stop", "length", "abort" or "error" once finished.
        stop_reason: the eos/stop token id or the stop string that ended it, else None.
        prompt_tokens, completion_tokens: usage so far.
        context_full: it ended because the model's context was full.
        error: why it failed, with finish reason "error", else None.
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
    error: Exception | None = None


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
    error: str | None = None


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, max_tokens: int | None = None) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's usual special tokens) or of chat messages
    (through the chat template, which writes its own special tokens; message content is encoded
    as text, so it cannot forge the template's markers).

    Args:
        tokenizer: the model's tokenizer.
        prompt: raw text, or chat messages.
        max_tokens: the model's context; a prompt whose characters cannot fit in it (at the
            tokenizer's most characters per token) is refused before it is tokenized. None: no
            check.

    Raises:
        InvalidParameterError: messages that are not a list of role/content objects (or more
            than `MAX_MESSAGES`), or text that is not a string.
        ContextLengthError: the prompt is too long for `max_tokens` by its characters alone.
    """
    if isinstance(prompt, str):
        _check_chars(tokenizer, len(prompt), max_tokens, "the prompt")
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        if len(prompt) > MAX_MESSAGES:
            raise InvalidParameterError(
                f"messages holds {len(prompt)} messages, more than the {MAX_MESSAGES} allowed; shorten the conversation"
            )
        _check_chars(tokenizer, sum(len(m["role"]) + len(m["content"]) for m in prompt), max_tokens, "the messages")
        return tokenizer.encode_chat(prompt, add_generation_prompt=True)
    raise InvalidParameterError(
        "a prompt is a string, or a non-empty list of messages like {'role': 'user', 'content': '...'}; "
        f"got {quote(prompt)}"
    )


def _check_chars(tokenizer: Tokenizer, chars: int, max_tokens: int | None, what: str) -> None:
    if max_tokens is None:
        return
    per_token = tokenizer.max_token_chars
    if chars > max_tokens * per_token:
        raise ContextLengthError(
            f"{what} has {chars} characters; a token of this tokenizer covers at most {per_token}, so that is more "
            f"than {chars // per_token} tokens, past the model's context of {max_tokens}; shorten it"
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
            try:
                deltas.append(self._delta(out, stream))
            except Exception as e:  # noqa: BLE001 - one request's text failing ends that request alone
                logger.error("request %s: its text could not be made: %r", out.request_id, e, exc_info=e)
                if not out.finished:
                    self.engine.abort(out.request_id)
                self._streams.pop(out.request_id, None)
                error = RequestFailedError(f"request {out.request_id} failed while its text was made "
                                           f"({type(e).__name__}); the server log has the details")
                deltas.append(TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens,
                                        out.completion_tokens, error=error))
        return deltas

    def _delta(self, out: RequestOutput, stream: TextStream) -> TextDelta:
        """The text delta of one engine output; ends the request at a stop string."""
        if out.error is not None:
            del self._streams[out.request_id]
            return TextDelta(out.request_id, "", [], True, "error", None, out.prompt_tokens, out.completion_tokens,
                             error=out.error)
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
        return TextDelta(
            out.request_id, text, list(out.new_token_ids), finished, reason, stop_reason,
            out.prompt_tokens, out.completion_tokens, out.context_full and stop is None,
        )


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
        ids = encode_prompt(self.tokenizer, request.prompt, self.engine.executor.config.max_position_embeddings)
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
        """Run `requests` to completion; returns one `Completion` each, in the order given (one
        that failed in the engine has finish reason "error" and says why in `error`).

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
        str(last.error) if last.error is not None else None,
    )


class AsyncLLM:
    """The engine stepped by a background thread, each request streamed to an asyncio consumer.

    Start it with `start()` (or `async with`), stop it with `shutdown()`. `stream(...)` is an
    async iterator of a request's `TextDelta`s; leaving it early (break, cancellation, a client
    gone) aborts the request, which frees its cache blocks before the next step. A request that
    fails in the engine raises its error from the stream; the others go on. If the engine thread
    itself stops on an error, every open stream raises, and the callbacks given to
    `add_failure_callback` are called with that error (from the engine thread).

    Nothing here blocks an event loop: the prompt is tokenized in a worker thread and aborts are
    posted to the engine thread, not awaited.

    Only the engine thread touches the engine while it runs. Adding, aborting and reading metrics
    are commands it runs between two steps, in the order they came, so each waits at most one
    step however busy the engine is (a lock taken around each step would be re-taken by the
    engine thread at once, and a new request could wait for the running ones to finish).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._outputs = OutputProcessor(engine, tokenizer)
        self._lock = threading.Lock()  # guards the fields below; never held through a step
        self._wake = threading.Condition(self._lock)
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._running = False  # the engine thread steps the engine; commands go through it
        self._stopping = False
        self._failed: BaseException | None = None  # what stopped the engine thread, if it failed
        self._thread: threading.Thread | None = None
        # The engine thread's alone while it runs: where each request's deltas go.
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._failure_callbacks: list[Callable[[BaseException], None]] = []

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the engine thread, or None."""
        return self._failed

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` if the engine thread stops on an error (from that thread)."""
        self._failure_callbacks.append(callback)

    def start(self) -> None:
        with self._wake:
            if self._thread is not None:
                return
            self._stopping, self._running, self._failed = False, True, None
            self._thread = threading.Thread(target=self._loop, name="quadapt-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread (commands already queued run first); requests still running stay
        in the engine, unstepped."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._wake:
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
            RequestFailedError: the request failed in the engine (the others go on).
        """
        context = self.engine.executor.config.max_position_embeddings
        ids = await asyncio.to_thread(encode_prompt, self.tokenizer, prompt, context)
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        added = self._submit(functools.partial(self._add, ids, params, adapter, rid, asyncio.get_running_loop(), queue))
        try:
            rid = await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self._submit(functools.partial(self._abort, rid))  # in case the add had begun: it runs first
            raise
        finished = False
        try:
            while True:
                delta: TextDelta | BaseException = await queue.get()
                if isinstance(delta, BaseException):  # the engine thread stopped (shut down, or failed)
                    raise delta
                finished = delta.finished
                if delta.error is not None:
                    raise delta.error
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                # Posted, not awaited: the engine thread frees the blocks before its next step,
                # and the loop never waits for the step in progress.
                self.abort(rid, wait=False)

    def abort(self, request_id: str, *, wait: bool = True) -> bool | None:
        """Cancel a request; its blocks are freed before the engine's next step.

        Args:
            request_id: the request.
            wait: wait for the abort to have run (up to the step in progress) and return whether
                the request was still unfinished; False returns None at once, which is what
                code on an event loop wants.
        """
        future = self._submit(functools.partial(self._abort, request_id))
        return future.result() if wait else None

    def metrics(self) -> MetricsSnapshot:
        """The engine's metrics, read between steps (the engine thread changes its queues)."""
        return self._submit(self.engine.metrics).result()

    def unload_adapter(self, name: str, *, wait: bool = True) -> concurrent.futures.Future | None:
        """Unload an adapter between two steps, after every command posted before it (so an abort
        posted for its last request has freed it).

        Args:
            name: the adapter.
            wait: wait for it (up to the step in progress), raising its error; False returns the
                future at once, for code on an event loop (`asyncio.wrap_future`).

        Raises:
            InvalidParameterError: this engine serves no adapters.
            AdapterNotFoundError, AdapterInUseError: as `AdapterRegistry.unload`.
        """
        registry = self.engine.adapters
        if registry is None:
            raise InvalidParameterError("this engine serves no adapters; start it with max_loras >= 1")
        future = self._submit(functools.partial(registry.unload, name))
        return future.result() if wait else future

    def load_adapter(self, name: str, path: str) -> None:
        """Load (or reload) an adapter while requests run."""
        if self.engine.adapters is None:
            raise InvalidParameterError("this engine serves no adapters; start it with max_loras >= 1")
        self.engine.adapters.load(name, path)  # the registry has its own lock; file reading happens outside ours

    # -- on the engine thread (or the caller's, when none runs) -----------------------------

    def _submit(self, command: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `command` on the engine thread between two steps; with no engine thread running,
        run it here and now (nothing else steps the engine then)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._running and threading.current_thread() is not self._thread:
                self._commands.append((command, future))
                self._wake.notify()
                return future
            _run(command, future)  # under the lock: two callers without an engine thread take turns
        return future

    def _add(
        self, ids: list[int], params: SamplingParams, adapter: str | None, rid: str,
        loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
    ) -> str:
        if not self._running:
            raise self._stopped_error()
        rid = self.engine.add_request(ids, params, adapter=adapter, request_id=rid)
        self._outputs.add(rid, params)
        self._queues[rid] = (loop, queue)
        return rid

    def _abort(self, request_id: str) -> bool:
        self._queues.pop(request_id, None)
        self._outputs.discard(request_id)
        return self.engine.abort(request_id)

    def _loop(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as e:
            logger.exception("the engine thread stopped after an error")
            self._stop_running(failed=e)

    def _turn(self) -> bool:
        """Run the commands that came since the last step, then one step; False once stopping."""
        with self._wake:
            while not (self._stopping or self._commands or self.engine.has_unfinished()):
                self._wake.wait()
            stopping = self._stopping
            if not stopping:
                commands, self._commands = self._commands, []
        if stopping:
            self._stop_running(failed=None)
            return False
        for command, future in commands:
            _run(command, future)
        if self.engine.has_unfinished():
            for delta in self._outputs.process(self.engine.step()):
                target = self._queues.get(delta.request_id)
                if delta.finished:
                    self._queues.pop(delta.request_id, None)
                if target is not None:
                    loop, queue = target
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, delta)
                    except RuntimeError:  # its event loop is closed: nobody listens any more
                        self._abort(delta.request_id)
        return True

    def _stop_running(self, failed: BaseException | None) -> None:
        """From here on callers run their commands themselves; those still queued run now, and
        every open stream raises an error that says why it ends (never a silent wait)."""
        with self._wake:
            self._running, self._failed = False, failed
            commands, self._commands = self._commands, []
            for command, future in commands:
                _run(command, future)
            for loop, queue in self._queues.values():
                with contextlib.suppress(RuntimeError):  # a closed loop has nobody to tell
                    loop.call_soon_threadsafe(queue.put_nowait, self._stopped_error())
            self._queues.clear()
        if failed is not None:
            for callback in self._failure_callbacks:
                try:
                    callback(failed)
                except Exception:  # noqa: BLE001 - one listener's bug must not hide the failure from the others
                    logger.exception("a failure callback of the engine thread raised")

    def _stopped_error(self) -> Exception:
        if self._failed is None:
            return RuntimeError("this AsyncLLM is not running (never started, or shut down): start() it first, or use `async with`")
        error = EngineDeadError(f"the engine stopped after an error ({self._failed!r}); see the log")
        error.__cause__ = self._failed
        return error


def _run(command: Callable[[], Any], future: concurrent.futures.Future) -> None:
    """Run a command into its future, unless its caller has already given up on it."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(command())
    except BaseException as e:  # the caller re-raises it
        future.set_exception(e)
