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

Hostile input (see docs/serving.md): every message is parsed here, so a malformed one is
INVALID_ARGUMENT; a prompt too long for the context by its characters alone is refused before it
is tokenized, and tokenizing and chat templates run in worker threads, so the event loop (health
checks included) never waits on them or on the engine. A request that fails in the engine is
INTERNAL for that request alone; if the engine thread itself stops, the server turns NOT_SERVING
(health, and `ServerInfo.state` FAILED) and `serve` exits non-zero for a supervisor to restart
it. Refusals are logged with the peer's address, at most `_REFUSAL_LOGS_PER_S` lines a second,
and every message quotes a client's values by a bounded prefix only.

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
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from ..protos.quadapt.v1 import generation_pb2 as pb
from ..protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
from .errors import (
    AdapterError, CheckpointError, ConfigError, ContextLengthError, EngineDeadError, InvalidParameterError,
    QuadaptError, RequestFailedError, UnsupportedError, quote,
)
from .llm import MAX_MESSAGES, AsyncLLM, TextDelta, encode_prompt
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
# The optional sampling fields: an unset one takes SamplingParams' default (greedy, 128 new tokens).
_OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")

# A QuadaptError's status code, by type; the first match wins (subclasses first).
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (RequestFailedError, grpc.StatusCode.INTERNAL),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
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
# The longest status message sent: a safety net under the bounded quotes of every message, since
# a message past gRPC's metadata limit reaches the client as RESOURCE_EXHAUSTED instead.
_MAX_STATUS_CHARS = 1024
# Refusal log lines per second; past that they are counted, and the count is logged with the next.
_REFUSAL_LOGS_PER_S = 20
# RPCs that answer whatever the server's state (ServerInfo says which state it is in).
_ANY_STATE = frozenset({"ServerInfo"})


def _rpc(request_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap an RPC whose request is a serialized `request_type`: parse it (a malformed message is
    INVALID_ARGUMENT), check its token and the server's state, map errors to status codes, count it."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        return _handler(method, request_type)

    return wrap


def _handler(method: Callable[..., Any], request_type: type) -> Callable[..., Any]:
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: _Servicer, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.server._authorize(context, admin=name in ADMIN_METHODS)
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {request_type.DESCRIPTOR.full_name} message (malformed protobuf, or "
                    "a string that is not UTF-8); build it with stubs generated from generation.proto",
                ) from None
            if name not in _ANY_STATE:
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
        if len(message) > _MAX_STATUS_CHARS:
            message = f"{message[:_MAX_STATUS_CHARS]}... (message cut at {_MAX_STATUS_CHARS} characters)"
        self.server._log_refusal(name, code, context, message)
        await context.abort(code, message)

    return handler


# Each RPC: its request type, response type, and whether the response is a stream.
_METHODS = {
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, False),
    "GenerateStream": (pb.GenerateRequest, pb.GenerateStreamResponse, True),
    "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse, False),
    "ListAdapters": (pb.ListAdaptersRequest, pb.ListAdaptersResponse, False),
    "LoadAdapter": (pb.LoadAdapterRequest, pb.LoadAdapterResponse, False),
    "UnloadAdapter": (pb.UnloadAdapterRequest, pb.UnloadAdapterResponse, False),
    "ServerInfo": (pb.ServerInfoRequest, pb.ServerInfoResponse, False),
}


def _add_servicer(servicer: _Servicer, server: grpc.aio.Server) -> None:
    """Register the Generation RPCs as the generated `add_GenerationServicer_to_server` does, but
    taking the request's bytes, so that `_rpc` parses them and answers a malformed one itself
    (grpc would answer UNKNOWN)."""
    handlers = {}
    for name, (_, response_type, streams) in _METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=None,
                              response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _Servicer(pb_grpc.GenerationServicer):
    """The Generation RPCs; each converts the proto at its top and bottom and holds no state."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @_rpc(pb.GenerateRequest)
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

    @_rpc(pb.GenerateRequest)
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async with self.server._generation(request, context) as generation:
            async for delta in generation:
                message = pb.GenerateStreamResponse(
                    text=delta.text, token_ids=delta.token_ids, request_id=generation.request_id
                )
                if delta.finished:
                    _finish(message, delta)
                await context.write(message)

    @_rpc(pb.TokenizeRequest)
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        llm = self.server.llm
        prompt = _prompt(request, llm.tokenizer)
        context_tokens = llm.engine.executor.config.max_position_embeddings

        def tokenize() -> pb.TokenizeResponse:
            ids = encode_prompt(llm.tokenizer, prompt, context_tokens)  # checks the size before it renders
            text = prompt if isinstance(prompt, str) else llm.tokenizer.apply_chat_template(prompt)
            return pb.TokenizeResponse(token_ids=ids, text=text)

        return await asyncio.to_thread(tokenize)

    @_rpc(pb.ListAdaptersRequest)
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        registry = self.server.llm.engine.adapters
        versions = registry.names() if registry is not None else []
        return pb.ListAdaptersResponse(adapters=[_adapter_info(v) for v in versions])

    @_rpc(pb.LoadAdapterRequest)
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
        logger.info("adapter %s %s from %s (%s)", quote(request.name), pb.LoadAdapterResponse.Outcome.Name(outcome), path,
                    version.identity)
        return pb.LoadAdapterResponse(adapter=_adapter_info(version), outcome=outcome)

    @_rpc(pb.UnloadAdapterRequest)
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        registry = self.server.llm.engine.adapters
        if registry is None:
            raise AdapterNotFoundError(f"unknown adapter {request.name!r}; this server serves the base model only")
        # Between two steps, after the aborts of streams that ended before this call.
        await asyncio.wrap_future(self.server.llm.unload_adapter(request.name, wait=False))
        logger.info("adapter %s unloaded", quote(request.name))
        return pb.UnloadAdapterResponse()

    @_rpc(pb.ServerInfoRequest)
    async def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        if self.server.llm is None:
            self.server._check_serving()  # loading, or failed to load: nothing to describe yet
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
            state=_STATES.get(self.server._state, pb.SERVER_STATE_UNSPECIFIED),
        )


_STATES = {"serving": pb.SERVER_STATE_SERVING, "draining": pb.SERVER_STATE_DRAINING, "failed": pb.SERVER_STATE_FAILED}


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
        self._log_load_error = True  # False where the caller reports it (`serve` raises it)
        self._engine_error: BaseException | None = None  # what stopped the engine thread while serving
        self._engine_dead = asyncio.Event()
        self._refusal_window = (0.0, 0, 0)  # (second, lines logged in it, lines suppressed since the last one)
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
            "failed": (f"the engine stopped after an error ({self._engine_error!r}); the server is restarting"
                       if self._engine_error is not None
                       else f"the model failed to load ({self._load_error}); see the server log"),
            "draining": "the server is shutting down; retry on another replica",
            "stopped": "the server has stopped",
        }[self._state]
        raise Refusal(grpc.StatusCode.UNAVAILABLE, why)

    def _log_refusal(self, method: str, code: grpc.StatusCode, context: grpc.aio.ServicerContext, message: str) -> None:
        """Log a refused RPC with its peer, at most `_REFUSAL_LOGS_PER_S` lines a second."""
        now = int(time.monotonic())
        second, logged, suppressed = self._refusal_window
        if now != second:
            second, logged = now, 0
        if logged >= _REFUSAL_LOGS_PER_S:
            self._refusal_window = (second, logged, suppressed + 1)
            return
        more = f" ({suppressed} more refusal(s) not logged)" if suppressed else ""
        self._refusal_window = (second, logged + 1, 0)
        logger.info("%s refused (%s) from %s%s: %s%s", method, code.name, _peer(context), _peer_request_id(context),
                    message, more)

    def _engine_failed(self, error: BaseException) -> None:
        """The engine thread stopped on an error: NOT_SERVING from now on, and `serve` exits."""
        if self._state == "stopped":
            return
        logger.critical("the engine stopped after an error and cannot serve any more: %r", error)
        self._engine_error, self._state = error, "failed"
        asyncio.ensure_future(self.health.enter_graceful_shutdown())  # every service NOT_SERVING
        self._engine_dead.set()

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
            logger.debug("%s%s: admitted (adapter %s)", generation.request_id, _peer_request_id(context),
                         quote(request.adapter))
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
            if self._log_load_error:
                logger.error("the model failed to load: %s", e)
            self._load_error, self._state = e, "failed"
            self._loaded.set()
            return
        if self._state != "loading":  # stopped while loading
            llm.shutdown()
        else:
            loop = asyncio.get_running_loop()
            llm.add_failure_callback(lambda error: loop.call_soon_threadsafe(self._engine_failed, error))
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
            "%s%s: %s (adapter %s, prompt %d, completion %d tokens, ttft %s, %.3fs)", self.request_id, peer_id,
            self.outcome, quote(self.adapter), *self._tokens, ttft, time.perf_counter() - self._start,
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
        AdapterError: a start-up adapter (`config.adapters`) that is missing or malformed, found
            from its config and header before the port is bound (its fit to the model is checked
            as the model loads).
    """
    for d in config.adapter_dirs:
        if not Path(d).is_dir():
            raise InvalidParameterError(f"adapter dir {d!r} is not a directory; create it or drop it")
    if llm is None:
        from .checkpoints.peft import read_peft_header

        for name, path in config.adapters.items():  # the cheap checks, before the port is bound
            try:
                read_peft_header(path)
            except QuadaptError as e:
                raise type(e)(f"adapter {name}={path}: {e}") from None
    server = Server(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared port
    ]
    grpc_server = grpc.aio.server(options=options)
    _add_servicer(_Servicer(server), grpc_server)
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
        server.metrics_port = server.metrics.serve_http(config.metrics_host.strip("[]"), config.metrics_port, config.metrics_tokens)
    logger.info("listening on %s:%d (%s)", config.host, server.port, "TLS" if config.tls_cert else "plaintext")
    if isinstance(llm, AsyncLLM):
        given = llm
        load: Callable[[], AsyncLLM] = lambda: given  # noqa: E731
    else:
        load = llm if llm is not None else functools.partial(load_llm, config)
    server._load_task = asyncio.ensure_future(server._load(load))
    return server


def serve(config: ServerConfig, *, llm: AsyncLLM | Callable[[], AsyncLLM] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain: new requests get UNAVAILABLE, in-flight ones
    finish (for up to `config.drain_timeout_s`), and the process may exit. A second signal stops
    at once.

    Args:
        config: what to serve and how.
        llm: as in `start` (None: load `config.model`).

    Raises:
        The model's load error (CheckpointError, ConfigError, AdapterError, ...) and
        InvalidParameterError for a port or TLS file that cannot be used.
        EngineDeadError: the engine stopped after an error it could not recover from; the
            server has stopped, and the process should exit non-zero so a supervisor restarts it.
    """
    asyncio.run(_serve(config, llm))


async def _serve(config: ServerConfig, llm: AsyncLLM | Callable[[], AsyncLLM] | None = None) -> None:
    server = await start(config, llm=llm)
    server._log_load_error = False  # raised below, and printed once by whoever called serve
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
    engine_dead = asyncio.ensure_future(server._engine_dead.wait())
    await asyncio.wait([signal_seen, engine_dead], return_when=asyncio.FIRST_COMPLETED)
    if engine_dead.done():
        signal_seen.cancel()
        await server.stop()
        raise EngineDeadError(
            f"the engine stopped after an error ({server._engine_error!r}); the server stopped, restart it"
        ) from server._engine_error
    engine_dead.cancel()
    await server.drain()


# -- proto <-> runtime ----------------------------------------------------------------------


def _prompt(request: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Any) -> str | list[dict[str, str]]:
    """The prompt text, or the chat messages, of a request; exactly one must be given."""
    if len(request.messages) > MAX_MESSAGES:  # before a dict is made of each
        raise InvalidParameterError(
            f"messages holds {len(request.messages)} messages, more than the {MAX_MESSAGES} allowed; "
            "shorten the conversation"
        )
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
    return [{"role": m.role, "content": m.content} for m in request.messages]


def _sampling(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling settings; an unset field takes SamplingParams' default, which names a bad one."""
    settings: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_SAMPLING if request.HasField(name)}
    return SamplingParams(**settings, stop=list(request.stop), ignore_eos=request.ignore_eos)


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


def _peer(context: grpc.aio.ServicerContext) -> str:
    """The client's address as grpc reports it (e.g. `ipv4:127.0.0.1:50544`), printable and short."""
    return "".join(c for c in str(context.peer())[:128] if c.isprintable())


def _peer_request_id(context: grpc.aio.ServicerContext) -> str:
    """` x-request-id=<id>` when the client sent one (for matching logs), printable and short."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            clean = "".join(c for c in str(value)[:64] if c.isprintable())
            return f" x-request-id={clean!r}"
    return ""
