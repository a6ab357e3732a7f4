"""The server: `quadapt.v1.Generation` over gRPC (and, with `http_port`, the OpenAI-compatible
HTTP API) over the batching engine, safe to put on a network.

`serve(config)` runs it until SIGTERM or SIGINT and then drains; `start(config)` is the same
server as an asyncio object (tests, embedding). One process serves one model: an `AsyncLLM`
steps the engine in its own thread, and every RPC is a coroutine on the server's event loop.
Beside the service run the standard `grpc.health.v1` health service (NOT_SERVING while the
model loads, while draining and after the engine failed) and server reflection. Around this
file: `rpc.py` (the RPCs: parsing, the proto <-> runtime conversion, status codes),
`config.py` (what to serve, and loading it), `security.py` (tokens, adapter paths,
TLS), `metrics.py` (Prometheus, on a port of its own), `requests.py` (the checks
both doors share) and `http_api.py` (the HTTP door). Both doors admit requests through
`Server.generation` and change adapters through `Server.load_adapter`/`unload_adapter`: one
queue limit, one drain, one set of adapters, one log.

Hostile input (see docs/serving.md): a prompt too long for the context by its characters alone
is refused before it is tokenized, and tokenizing and chat templates run in worker threads, so
the event loop (health checks included) never waits on them or on the engine. A request that
fails in the engine is INTERNAL for that request alone; if the engine thread itself stops, the
server turns NOT_SERVING (health, and `ServerInfo.state` FAILED) and `serve` exits non-zero for a
supervisor to restart it. Refusals are logged with the peer's address, at most
`_REFUSAL_LOGS_PER_S` lines a second, and every message quotes a client's values by a bounded
prefix only. Requests are never logged with their text, only their id.

Security (all optional, see `ServerConfig`): TLS or mutual TLS; bearer tokens compared in
constant time, with a separate admin token for LoadAdapter and UnloadAdapter; adapters load at
run time only from allowed directories, by real path (no `..` or symlink escape). Health and
reflection answer without a token, as probes and tools expect.
"""

from __future__ import annotations

import asyncio
import gc
import contextlib
import functools
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

from ...protos.quadapt.v1 import generation_pb2 as pb
from ..errors import EngineDeadError, InvalidParameterError, QuadaptError, quote
from ..api.async_llm import AsyncLLM
from ..text.prompt import Prompt
from ..engine.metrics import MetricsSnapshot
from .config import ServerConfig, load_llm, read_secret
from .metrics import Generation, ServerMetrics
from ..text.sampling_params import SamplingParams
from .rpc import SERVICE, Servicer, add_servicer
from .security import Refusal, authorize, resolve_adapter_path, server_credentials

__all__ = ["SERVICE", "Server", "ServerConfig", "load_llm", "read_secret", "serve", "start"]

logger = logging.getLogger(__name__)

# Refusal log lines per second; past that they are counted, and the count is logged with the next.
_REFUSAL_LOGS_PER_S = 20


class Server:
    """A running server; made by `start`. Attributes: `port` (the bound port), `metrics_port` and
    `http_port` (None without that endpoint), `llm` (None until the model has loaded), `config`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.llm: AsyncLLM | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.model_id = config.model_name or Path(config.model).name  # ServerInfo's model, /v1/models' base id
        self.started = int(time.time())
        self.adapter_dirs = [Path(os.path.realpath(d)) for d in config.adapter_dirs]
        self.metrics = ServerMetrics(self._engine_view)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None  # http_api.HTTPFrontDoor, with config.http_port
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

    @property
    def state(self) -> str:
        """"loading", "serving", "failed", "draining" or "stopped"."""
        return self._state

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
        if self._http is not None:
            await self._http.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            gc.unfreeze()  # what the start froze is collectable again (and freed at exit)
        self.metrics.close()
        self._stopped.set()
        logger.info("stopped")

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    # -- inside the server ------------------------------------------------------------------

    def check_token(self, metadata: Any, admin: bool) -> None:
        """Check a request's bearer token (`server_security.authorize`); `metadata`: its (key, value) pairs."""
        authorize(metadata, self.config.token, self.config.admin_token, admin=admin)

    def check_serving(self) -> None:
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

    def log_refusal(self, method: str, code: grpc.StatusCode, who: str, message: str) -> None:
        """Log a refused request with `who` sent it (its peer and request id), at most
        `_REFUSAL_LOGS_PER_S` lines a second, whichever door it came through."""
        now = int(time.monotonic())
        second, logged, suppressed = self._refusal_window
        if now != second:
            second, logged = now, 0
        if logged >= _REFUSAL_LOGS_PER_S:
            self._refusal_window = (second, logged, suppressed + 1)
            return
        more = f" ({suppressed} more refusal(s) not logged)" if suppressed else ""
        self._refusal_window = (second, logged + 1, 0)
        logger.info("%s refused (%s) from %s: %s%s", method, code.name, who, message, more)

    def _engine_failed(self, error: BaseException) -> None:
        """The engine thread stopped on an error: NOT_SERVING from now on, and `serve` exits."""
        if self._state == "stopped":
            return
        logger.critical("the engine stopped after an error and cannot serve any more: %r", error)
        self._engine_error, self._state = error, "failed"
        asyncio.ensure_future(self.health.enter_graceful_shutdown())  # every service NOT_SERVING
        self._engine_dead.set()

    @contextlib.asynccontextmanager
    async def generation(self, prompt: Prompt, params: SamplingParams, adapter: str | None, *, who: str = "",
                         deadline_passed: Callable[[], bool] = lambda: False) -> AsyncIterator[Generation]:
        """Admit one generation (or refuse it), and account for it until it is over, however it ends.

        Both front doors come through here, so they share one queue limit, one drain and one log.

        Args:
            prompt, params, adapter: the request, already parsed and checked (`server_requests`).
            who: the client, for the log (e.g. its x-request-id).
            deadline_passed: whether a cancellation means the client's deadline passed.
        """
        if self._active >= self.config.max_queue:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server's queue is full ({self._active} requests, max_queue {self.config.max_queue}); retry later",
            )
        generation = Generation(f"req-{next(self._ids)}", adapter or "", self.metrics)
        self._active += 1
        self._idle.clear()
        deltas = self.llm.stream(prompt, params, adapter=adapter, request_id=generation.request_id)
        try:
            generation.deltas = deltas
            logger.debug("%s%s: admitted (adapter %s)", generation.request_id, who, quote(adapter or ""))
            yield generation
        except asyncio.CancelledError:
            generation.outcome = (
                "cancelled: the server stopped" if self._closing.is_set()
                else "deadline exceeded" if deadline_passed() else "cancelled by the client"
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
            generation.log(who)

    # -- adapters, for both doors -----------------------------------------------------------

    def adapter_versions(self) -> list[Any]:
        """The loaded adapters' versions (name, digest, rank, slot, requests), by name."""
        return self.llm.adapter_versions()

    async def load_adapter(self, name: str, path: str, *, pinned: bool = False) -> tuple[Any, str]:
        """Load (or reload) an adapter a client names, from inside the allowed directories.

        Returns:
            The adapter's version, and "loaded", "reloaded" or "unchanged".

        Raises:
            Refusal: a path outside `adapter_dirs`.
            AdapterError: files that are malformed or do not fit the model, or a model without
                adapter slots.
        """
        real = resolve_adapter_path(path, self.adapter_dirs)
        before = {v.name: v for v in self.llm.adapter_versions()}.get(name)
        # Reading and checking the files blocks; the registry's own lock makes it safe beside the engine.
        version = await asyncio.to_thread(self.llm.load_adapter, name, real, pinned=pinned)
        outcome = "loaded" if before is None else "unchanged" if version is before else "reloaded"
        logger.info("adapter %s %s from %s (%s)", quote(name), outcome, real, version.identity)
        return version, outcome

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter between two engine steps, after the aborts of streams that ended before.

        Raises:
            AdapterNotFoundError, AdapterInUseError: as `AdapterRegistry.unload`.
        """
        await asyncio.wrap_future(self.llm.unload_adapter(name, wait=False))
        logger.info("adapter %s unloaded", quote(name))

    def _engine_view(self) -> tuple[MetricsSnapshot, list[str], int] | None:
        llm = self.llm
        if llm is None:
            return None
        names = [v.name for v in self.adapter_versions()]
        return llm.metrics(), names, llm.engine.config.max_loras  # read by the engine thread, between two steps

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
            # What is alive now lives as long as the server. Frozen, it is off the cyclic
            # collector's full passes, which otherwise walk it while requests wait: a full pass
            # over a loaded server's ~180k objects took 94 ms, measured.
            gc.collect()
            gc.freeze()
            self.llm, self._state = llm, "serving"
            for service in ("", SERVICE):
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            logger.info("serving %s on the %s executor", self.config.model_name or self.config.model,
                        getattr(llm.engine.executor, "name", type(llm.engine.executor).__name__))
        self._loaded.set()


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
        from ..checkpoints.peft import read_peft_header

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
    add_servicer(Servicer(server), grpc_server)
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
    if config.http_port is not None:
        from .http_api import HTTPFrontDoor

        server._http = HTTPFrontDoor(server, config.http_host or config.host, config.http_port)
        server.http_port = server._http.port
    server._grpc = grpc_server
    await grpc_server.start()
    if server._http is not None:
        await server._http.start()
    if config.metrics_port is not None:
        server.metrics_port = server.metrics.serve_http(config.metrics_host.strip("[]"), config.metrics_port, config.metrics_tokens)
    logger.info("listening on %s:%d (%s)", config.host, server.port, "TLS" if config.tls_cert else "plaintext")
    if server.http_port is not None:
        logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if config.tls_cert else "http",
                    config.http_host or config.host, server.http_port)
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
