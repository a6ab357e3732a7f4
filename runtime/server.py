"""The gRPC server: `quadapt.v1.Generation` over the batching engine, safe to put on a network.

`serve(config)` runs it until SIGTERM or SIGINT and then drains; `start(config)` is the same
server as an asyncio object (tests, embedding). One process serves one model: an `AsyncLLM`
steps the engine in its own thread, and every RPC is a coroutine on the server's event loop.
Beside the service run the standard `grpc.health.v1` health service (NOT_SERVING while the
model loads and while draining) and server reflection. Around this file: `server_config.py`
(what to serve, and loading it), `server_security.py` (tokens, adapter paths, TLS) and
`server_metrics.py` (Prometheus, on a port of its own).

This module is the only importer of the generated stubs (with `client.py`): protobuf messages
are turned into the runtime's types (`SamplingParams`, prompt text or chat messages, adapter
names) at the top of each RPC, and `TextDelta`s back into messages at the bottom. Errors are
status codes: a `QuadaptError` maps by its type (`_CODES`), and the message, which names the
field, is the status details. Requests are never logged with their text, only their id.

Security (all optional, see `ServerConfig`): TLS or mutual TLS; bearer tokens compared in
constant time, with a separate admin token for LoadAdapter and UnloadAdapter; adapters load at
run time only from allowed directories, by real path (no `..` or symlink escape). Health and
reflection answer without a token, as probes and tools expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..protos.quadapt.v1 import generation_pb2 as pb
from ..protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
from .errors import (
    AdapterError, CheckpointError, ConfigError, ContextLengthError, InvalidParameterError, QuadaptError,
    UnsupportedError,
)
from .llm import AsyncLLM, TextDelta, encode_prompt
from .metrics import MetricsSnapshot
from .registry import AdapterInUseError, AdapterNotFoundError
from .sampling import SamplingParams
from .server_config import ServerConfig, load_llm, read_secret
from .server_metrics import ServerMetrics
from .server_security import Refusal, authorize, resolve_adapter_path, server_credentials

__all__ = ["SERVICE", "Server", "ServerConfig", "load_llm", "read_secret", "serve", "start"]

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "quadapt.v1.Generation"
ADMIN_METHODS = frozenset({"LoadAdapter", "UnloadAdapter"})
# What an unset sampling field means: `quadapt generate`'s defaults (greedy, 128 new tokens).
DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}

# A QuadaptError's status code, by type; the first match wins (subclasses first).
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterInUseError, grpc.StatusCode.FAILED_PRECONDITION),
    (ContextLengthError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    # An adapter file that is corrupt, unsupported or made for another base.
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an RPC: check its token and the server's state, map errors to status codes, count it."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: _Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.server._authorize(context, admin=name in ADMIN_METHODS)
            self.server._check_serving()
            response = await method(self, request, context)
        except Refusal as e:
            code, message = e.code, str(e)
        except QuadaptError as e:
            code = next(c for t, c in (*_CODES, (QuadaptError, grpc.StatusCode.INVALID_ARGUMENT)) if isinstance(e, t))
            message = str(e)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            self.server.metrics.rpcs.labels(name, "CANCELLED").inc()
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {name}; the server log has the details"
        else:
            self.server.metrics.rpcs.labels(name, "OK").inc()
            return response
        self.server.metrics.rpcs.labels(name, code.name).inc()
        logger.info("%s refused (%s%s): %s", name, code.name, _peer_request_id(context), message)
        await context.abort(code, message)

    return handler


class _Servicer(pb_grpc.GenerationServicer):
    """The Generation RPCs; each converts the proto at its top and bottom and holds no state."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async with self.server._generation(request, context) as generation:
            async for delta in generation:
                response.text += delta.text
                response.token_ids.extend(delta.token_ids)
                if delta.finished:
                    _finish(response, delta)
            response.request_id = generation.request_id
        return response

    @_rpc
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async with self.server._generation(request, context) as generation:
            async for delta in generation:
                message = pb.GenerateStreamResponse(
                    text=delta.text, token_ids=delta.token_ids, request_id=generation.request_id
                )
                if delta.finished:
                    _finish(message, delta)
                await context.write(message)

    @_rpc
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        tokenizer = self.server.llm.tokenizer
        prompt = _prompt(request, tokenizer)
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt)
        return pb.TokenizeResponse(token_ids=encode_prompt(tokenizer, prompt), text=text)

    @_rpc
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        registry = self.server.llm.engine.adapters
        versions = registry.names() if registry is not None else []
        return pb.ListAdaptersResponse(adapters=[_adapter_info(v) for v in versions])

    @_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        registry = self.server.llm.engine.adapters
        if registry is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "this server serves the base model only (max_loras=0)")
        path = resolve_adapter_path(request.path, self.server.adapter_dirs)
        before = {v.name: v for v in registry.names()}.get(request.name)
        # Reading and checking the files blocks; the registry's own lock makes it safe beside the engine.
        version = await asyncio.to_thread(registry.load, request.name, path, pinned=request.pinned)
        outcome = (
            pb.LoadAdapterResponse.OUTCOME_LOADED if before is None
            else pb.LoadAdapterResponse.OUTCOME_UNCHANGED if version is before
            else pb.LoadAdapterResponse.OUTCOME_RELOADED
        )
        logger.info("adapter %r %s from %s (%s)", request.name, pb.LoadAdapterResponse.Outcome.Name(outcome), path,
                    version.identity)
        return pb.LoadAdapterResponse(adapter=_adapter_info(version), outcome=outcome)

    @_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        registry = self.server.llm.engine.adapters
        if registry is None:
            raise AdapterNotFoundError(f"unknown adapter {request.name!r}; this server serves the base model only")
        registry.unload(request.name)
        logger.info("adapter %r unloaded", request.name)
        return pb.UnloadAdapterResponse()

    @_rpc
    async def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        config, engine = self.server.config, self.server.llm.engine
        model_config = engine.executor.config
        try:
            version = importlib.metadata.version("quadapt")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return pb.ServerInfoResponse(
            model=config.model_name or Path(config.model).name,
            version=version,
            max_context_tokens=model_config.max_position_embeddings,
            vocab_size=model_config.vocab_size,
            chat_template=self.server.llm.tokenizer.chat_template is not None,
            max_queue=config.max_queue,
            max_batch=engine.config.max_num_seqs,
            max_loras=engine.config.max_loras,
            max_lora_rank=engine.config.max_lora_rank,
            max_message_bytes=config.max_message_bytes,
        )


class Server:
    """A running server; made by `start`. Attributes: `port` (the bound port), `metrics_port`
    (None without an endpoint), `llm` (None until the model has loaded), `config`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.llm: AsyncLLM | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.adapter_dirs = [Path(os.path.realpath(d)) for d in config.adapter_dirs]
        self.metrics = ServerMetrics(self._engine_view)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._state: Literal["loading", "serving", "failed", "draining", "stopped"] = "loading"
        self._load_error: BaseException | None = None
        self._loaded = asyncio.Event()
        self._active = 0  # generation requests admitted and not yet over: waiting + running
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._ids = itertools.count()
        self._load_task: asyncio.Future[None] | None = None

    async def ready(self) -> None:
        """Wait until the model has loaded and the server is SERVING.

        Raises:
            The load's error (e.g. CheckpointError), if it failed; the server keeps running,
            NOT_SERVING, until stopped.
        """
        await self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests (UNAVAILABLE, health NOT_SERVING), let in-flight ones finish for
        up to `timeout` seconds (None: `config.drain_timeout_s`), then stop. Returns True when
        none was left to cancel."""
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        if self._state in ("loading", "serving", "failed"):
            self._state = "draining"
            await self.health.enter_graceful_shutdown()
            logger.info("draining: %d request(s) in flight, up to %g s", self._active, timeout)
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._closing.wait())]
        done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        clean = self._active == 0
        if not clean:
            logger.warning("drain: cancelling %d request(s) still in flight", self._active)
        await self.stop()
        return clean

    async def stop(self) -> None:
        """Stop at once: in-flight requests are cancelled (their cache freed), then the engine stops."""
        self._closing.set()
        if self._state == "stopped":
            await self._stopped.wait()
            return
        self._state = "stopped"
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
        self.metrics.close()
        self._stopped.set()
        logger.info("stopped")

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    # -- inside the server ------------------------------------------------------------------

    def _authorize(self, context: grpc.aio.ServicerContext, admin: bool) -> None:
        authorize(context.invocation_metadata(), self.config.token, self.config.admin_token, admin=admin)

    def _check_serving(self) -> None:
        if self._state == "serving":
            return
        why = {
            "loading": "the model is still loading; retry shortly (health says SERVING once it is ready)",
            "failed": f"the model failed to load ({self._load_error}); see the server log",
            "draining": "the server is shutting down; retry on another replica",
            "stopped": "the server has stopped",
        }[self._state]
        raise Refusal(grpc.StatusCode.UNAVAILABLE, why)

    @contextlib.asynccontextmanager
    async def _generation(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[_Generation]:
        """Admit one generation (or refuse it), and account for it until it is over, however it ends."""
        llm = self.llm
        prompt = _prompt(request, llm.tokenizer)
        params = _sampling(request)
        if self._active >= self.config.max_queue:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server's queue is full ({self._active} requests, max_queue {self.config.max_queue}); retry later",
            )
        generation = _Generation(f"req-{next(self._ids)}", request.adapter, self.metrics)
        self._active += 1
        self._idle.clear()
        deltas = llm.stream(prompt, params, adapter=request.adapter or None, request_id=generation.request_id)
        try:
            generation.deltas = deltas
            logger.debug("%s%s: admitted (adapter %r)", generation.request_id, _peer_request_id(context), request.adapter)
            yield generation
        except asyncio.CancelledError:
            deadline = context.time_remaining() is not None and context.time_remaining() <= 0
            generation.outcome = (
                "cancelled: the server stopped" if self._closing.is_set()
                else "deadline exceeded" if deadline else "cancelled by the client"
            )
            raise
        except BaseException as e:
            generation.outcome = f"failed: {type(e).__name__}"
            raise
        finally:
            await deltas.aclose()  # aborts the request unless it finished: its cache blocks are freed
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            generation.log(_peer_request_id(context))

    def _engine_view(self) -> tuple[MetricsSnapshot, list[str]] | None:
        llm = self.llm
        if llm is None:
            return None
        registry = llm.engine.adapters
        names = [v.name for v in registry.names()] if registry is not None else []
        return llm.metrics(), names  # read by the engine thread, between two steps

    async def _load(self, load: Callable[[], AsyncLLM]) -> None:
        try:
            llm = await asyncio.to_thread(load)
        except Exception as e:  # reported by ready(), and logged here for a server nobody awaits
            logger.error("the model failed to load: %s", e)
            self._load_error, self._state = e, "failed"
            self._loaded.set()
            return
        if self._state != "loading":  # stopped while loading
            llm.shutdown()
        else:
            llm.start()
            self.llm, self._state = llm, "serving"
            for service in ("", SERVICE):
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            logger.info("serving %s", self.config.model_name or self.config.model)
        self._loaded.set()


class _Generation:
    """One admitted generation: its id, its deltas, and the timings the metrics and the log want."""

    def __init__(self, request_id: str, adapter: str, metrics: ServerMetrics) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self.deltas: AsyncIterator[TextDelta] | None = None
        self.outcome = "unfinished"
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._tokens = (0, 0)

    async def __aiter__(self) -> AsyncIterator[TextDelta]:
        assert self.deltas is not None
        async for delta in self.deltas:
            now = time.perf_counter()
            if delta.token_ids:
                if self._first is None:
                    self._first = now
                    self._metrics.time_to_first_token.labels(self.adapter).observe(now - self._start)
                else:
                    self._metrics.inter_token_latency.labels(self.adapter).observe(now - self._last)
                self._last = now
            self._tokens = (delta.prompt_tokens, delta.completion_tokens)
            if delta.finished:
                self.outcome = delta.finish_reason or "finished"
                self._metrics.request_duration.labels(self.adapter).observe(now - self._start)
            yield delta

    def log(self, peer_id: str) -> None:
        ttft = f"{self._first - self._start:.3f}s" if self._first is not None else "-"
        logger.info(
            "%s%s: %s (adapter %r, prompt %d, completion %d tokens, ttft %s, %.3fs)", self.request_id, peer_id,
            self.outcome, self.adapter, *self._tokens, ttft, time.perf_counter() - self._start,
        )


async def start(config: ServerConfig, *, llm: AsyncLLM | Callable[[], AsyncLLM] | None = None) -> Server:
    """Start serving `config` on the running event loop; returns once the port is bound.

    The model loads in a thread after that (health NOT_SERVING, Generation RPCs UNAVAILABLE
    meanwhile); `await server.ready()` waits for it. Stop with `drain()` or `stop()`.

    Args:
        config: what to serve and how.
        llm: an engine already built (taken over: the server starts and stops it), or a
            function that builds one (run in a thread); None loads `config.model` (`load_llm`).

    Returns:
        The running `Server`.

    Raises:
        InvalidParameterError: TLS files that cannot be read, an adapter dir that is not a
            directory, a port that cannot be bound.
    """
    for d in config.adapter_dirs:
        if not Path(d).is_dir():
            raise InvalidParameterError(f"adapter dir {d!r} is not a directory; create it or drop it")
    server = Server(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared port
    ]
    grpc_server = grpc.aio.server(options=options)
    pb_grpc.add_GenerationServicer_to_server(_Servicer(server), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, grpc_server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], grpc_server
    )
    for service in ("", SERVICE):
        await server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    address = f"{host}:{config.port}"
    try:
        if config.tls_cert is not None:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            server.port = grpc_server.add_secure_port(address, credentials)
        else:
            server.port = grpc_server.add_insecure_port(address)
    except RuntimeError as e:
        raise InvalidParameterError(f"cannot listen on {address}: {e}; is the port in use?") from None
    if not server.port:
        raise InvalidParameterError(f"cannot listen on {address}; is the port in use?")
    server._grpc = grpc_server
    await grpc_server.start()
    if config.metrics_port is not None:
        server.metrics_port = server.metrics.serve_http((config.metrics_host or config.host).strip("[]"), config.metrics_port)
    logger.info("listening on %s:%d (%s)", config.host, server.port, "TLS" if config.tls_cert else "plaintext")
    if isinstance(llm, AsyncLLM):
        given = llm
        load: Callable[[], AsyncLLM] = lambda: given  # noqa: E731
    else:
        load = llm if llm is not None else functools.partial(load_llm, config)
    server._load_task = asyncio.ensure_future(server._load(load))
    return server


def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain: new requests get UNAVAILABLE, in-flight ones
    finish (for up to `config.drain_timeout_s`), and the process may exit. A second signal stops
    at once.

    Raises:
        The model's load error (CheckpointError, ConfigError, AdapterError, ...) and
        InvalidParameterError for a port or TLS file that cannot be used.
    """
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    server = await start(config)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if signalled.is_set():
            logger.warning("%s again: stopping now", sig.name)
            asyncio.ensure_future(server.stop())
        else:
            logger.info("%s: draining", sig.name)
            signalled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    ready = asyncio.ensure_future(server.ready())
    signal_seen = asyncio.ensure_future(signalled.wait())
    await asyncio.wait([ready, signal_seen], return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:  # the model failed to load: nothing to serve
        signal_seen.cancel()
        await server.stop()
        raise ready.exception()
    await signal_seen
    await server.drain()


# -- proto <-> runtime ----------------------------------------------------------------------


def _prompt(request: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Any) -> str | list[dict[str, str]]:
    """The prompt text, or the chat messages, of a request; exactly one must be given."""
    if request.prompt and request.messages:
        raise InvalidParameterError("give exactly one of prompt (raw text) and messages (chat), not both")
    if not request.messages:
        if not request.prompt:
            raise InvalidParameterError("prompt is empty and there are no messages; give one of the two")
        return request.prompt
    for i, message in enumerate(request.messages):
        if not message.role:
            raise InvalidParameterError(f"messages[{i}].role is empty; use e.g. 'system', 'user' or 'assistant'")
    if tokenizer.chat_template is None:
        raise InvalidParameterError("messages need a chat template, which this model has none of; send raw text in prompt")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        tokenizer.apply_chat_template(messages)  # a template's own refusal, named as the field's
    except QuadaptError as e:
        raise InvalidParameterError(f"messages: {e}") from None
    return messages


def _sampling(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling settings; an unset field takes `DEFAULTS`. SamplingParams names a bad one."""
    settings: dict[str, Any] = {
        name: getattr(request, name) if request.HasField(name) else default for name, default in DEFAULTS.items()
    }
    seed = request.seed if request.HasField("seed") else None
    return SamplingParams(**settings, seed=seed, stop=list(request.stop), ignore_eos=request.ignore_eos)


def _finish(message: pb.GenerateResponse | pb.GenerateStreamResponse, delta: TextDelta) -> None:
    message.finish_reason = _FINISH.get(delta.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
    message.usage.prompt_tokens = delta.prompt_tokens
    message.usage.completion_tokens = delta.completion_tokens
    message.context_full = delta.context_full
    if isinstance(delta.stop_reason, str):
        message.stop_string = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        message.stop_token_id = delta.stop_reason


def _adapter_info(version: Any) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=version.name, digest=version.digest, rank=version.max_rank, pinned=version.pinned,
        in_slot=version.slot is not None, requests=max(version.requests, 0),
    )


def _peer_request_id(context: grpc.aio.ServicerContext) -> str:
    """` x-request-id=<id>` when the client sent one (for matching logs), printable and short."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            clean = "".join(c for c in str(value)[:64] if c.isprintable())
            return f" x-request-id={clean!r}"
    return ""
