"""`quadapt.AsyncLLM`: the batching engine stepped by a background thread, each request streamed to asyncio.

`AsyncLLM("smollm2", adapters={...})` builds the engine as `LLM` does (`EngineArgs`/
`build_engine`); `AsyncLLM.from_engine(engine, tokenizer)` wraps one already built (the gRPC
server does). `stream` yields one request's text deltas, batched with every other open stream
and `generate` call, and cancels the request (its cache blocks freed before the engine's next
step) when the consumer stops listening. Adapters load, unload and list here while requests run.

Tokenization happens in a worker thread and aborts are posted, so nothing here makes an event
loop wait for the engine. Requests and outputs are `outputs.py`'s; the synchronous front door
is `llm.LLM`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from ..engine.engine import Engine
from ..errors import EngineDeadError, InvalidParameterError
from ..engine.metrics import MetricsSnapshot
from .front import EngineFront
from .outputs import (
    Completion, TextDelta, completion_of, is_adapter_name, is_params, requests_of, sampling_params,
)
from ..text.prompt import Prompt, text_or_messages
from ..text.sampling_params import SamplingParams
from ..text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class AsyncLLM(EngineFront):
    """The engine stepped by a background thread, each request streamed to an asyncio consumer.

    Args:
        model: a checkpoint directory or `.gguf` file (it must carry a tokenizer).
        **options: the engine's options, as `LLM`'s (`EngineArgs`' fields).

    Raises:
        As `LLM`.

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

    def _attach(self, engine: Engine, tokenizer: Tokenizer, path: Path | None) -> None:
        super()._attach(engine, tokenizer, path)
        self._lock = threading.Lock()  # guards the fields below; never held through a step
        self._wake = threading.Condition(self._lock)
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._running = False  # the engine thread steps the engine; commands go through it
        self._stopping = False
        self._failed: BaseException | None = None  # what stopped the engine thread, if it failed
        self._thread: threading.Thread | None = None
        # The engine thread's alone while it runs: where each request's deltas go.
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> AsyncIterator[TextDelta]:
        """Generate for one request, yielding its text deltas; the last has `finished` True.
        Leaving early cancels the request and frees its cache: at once when the consuming task is
        cancelled or the stream is closed (`contextlib.aclosing`), and after a bare `break` when
        the event loop next runs (Python closes an abandoned generator from there).

        Args:
            prompt, chat: one prompt, as `LLM.generate`'s.
            params, **settings: its sampling settings, as `LLM.generate`'s.
            adapter: the name of a loaded adapter, or None for the base model.
            request_id: a unique id; None makes one.

        Raises:
            InvalidParameterError, ContextLengthError, AdapterNotFoundError: when first iterated,
                before anything runs.
            RequestFailedError: the request failed in the engine (the others go on).
        """
        params = sampling_params(params, settings)
        if not is_params(params):
            raise InvalidParameterError(f"params must be a SamplingParams, got {params!r:.200}")
        if not is_adapter_name(adapter):
            raise InvalidParameterError(f"adapter must be an adapter name or None, got {adapter!r:.200}")
        rid, queue = await self._open(text_or_messages(prompt, chat), params, adapter, request_id)
        finished = False
        try:
            while True:
                delta = await _next(queue)
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

    async def _open(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None, request_id: str | None
    ) -> tuple[str, asyncio.Queue]:
        """Tokenize (in a worker thread) and queue one request; its id and the queue its deltas come to."""
        context = self.engine.executor.config.max_position_embeddings
        ids = await asyncio.to_thread(self.tokenizer.encode_prompt, prompt, max_tokens=context)
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        added = self._submit(functools.partial(self._add, ids, params, adapter, rid, asyncio.get_running_loop(), queue))
        try:
            return await asyncio.wrap_future(added), queue
        except asyncio.CancelledError:
            self._submit(functools.partial(self._abort, rid))  # in case the add had begun: it runs first
            raise

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

    async def generate(
        self,
        prompts: Any,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
        chat: bool | None = None,
        **settings: Any,
    ) -> list[Completion]:
        """Run every prompt to completion, batched with the open streams; as `LLM.generate`.

        Raises:
            As `LLM.generate`, before any request runs (one that fails to queue takes back those
            queued before it).
        """
        requests = requests_of(prompts, params, adapter, chat, settings)
        opened: list[tuple[str, asyncio.Queue]] = []
        try:
            for r in requests:
                opened.append(await self._open(r.prompt, r.params, r.adapter, r.request_id))
            return list(await asyncio.gather(*(_completion(rid, queue) for rid, queue in opened)))
        except BaseException:  # a request refused, the caller cancelled, or the engine thread stopped
            for rid, _ in opened:
                self.abort(rid, wait=False)  # posted: those still unfinished are freed before the next step
            raise

    def unload_adapter(self, name: str, *, wait: bool = True) -> concurrent.futures.Future | None:
        """Unload an adapter between two steps, after every command posted before it (so an abort
        posted for its last request has freed it).

        Args:
            name: the adapter.
            wait: wait for it (up to the step in progress), raising its error; False returns the
                future at once, for code on an event loop (`asyncio.wrap_future`).

        Raises:
            AdapterNotFoundError, AdapterInUseError: as `AdapterRegistry.unload`.
        """
        future = self._submit(functools.partial(self.engine.adapters.unload, name))
        if wait:
            future.result()
            return None
        return future

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


async def _next(queue: asyncio.Queue) -> TextDelta:
    """A request's next delta; raises what stopped the engine thread (shut down, or failed)."""
    delta: TextDelta | BaseException = await queue.get()
    if isinstance(delta, BaseException):
        raise delta
    return delta


async def _completion(rid: str, queue: asyncio.Queue) -> Completion:
    """A request's deltas until it finishes (one that fails has finish reason "error")."""
    parts = [await _next(queue)]
    while not parts[-1].finished:
        parts.append(await _next(queue))
    return completion_of(rid, parts)


def _run(command: Callable[[], Any], future: concurrent.futures.Future) -> None:
    """Run a command into its future, unless its caller has already given up on it."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(command())
    except BaseException as e:  # the caller re-raises it
        future.set_exception(e)
