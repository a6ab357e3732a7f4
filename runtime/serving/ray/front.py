"""The cluster's front door: the single server's HTTP routes and RPCs, each generation forwarded to
the engine replica that holds its adapter.

The ingress deployment runs the same code as `quadapt serve`: `http_api.make_app` answers the
OpenAI-compatible routes through Serve's HTTP proxy, and `rpc.Servicer` the `quadapt.v1.Generation`
RPCs through Serve's gRPC proxy, both over a `ClusterServer`, the single `Server` whose engine is
a `RemoteLLM`. So a request is parsed, checked and answered by one set of rules whatever serves
it, and a client of one server works unchanged against the cluster. `RemoteLLM.stream` calls
the engine deployment through a handle with the adapter as the multiplexed model id, so Serve
routes it to a replica that already holds the adapter when one does. The front door holds the
tokenizer (for chat templates and prompt sizes) but no weights.

Statuses keep their meaning: an adapter no resolver serves is NOT_FOUND / 404 here, before any
routing; a replica that dies under a request fails that request with UNAVAILABLE / 503
(`EngineDeadError`), never a partial answer passed off as whole. Each answer names where it ran:
the HTTP headers and gRPC trailing metadata `x-quadapt-replica` and `x-quadapt-adapter-hit`
("1" when the adapter was loaded on that replica before the request, "0" when the request loaded
it). Loading and unloading adapters by call are refused: in a cluster adapters load on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc

from ...errors import EngineDeadError, QuadaptError
from ...text.prompt import Prompt
from ...text.sampling_params import SamplingParams
from ..config import ServerConfig
from ..security import Refusal
from ..server import Server
from .replica import Placement
from .resolver import AdapterResolver

logger = logging.getLogger(__name__)

REPLICA_HEADER, HIT_HEADER = "x-quadapt-replica", "x-quadapt-adapter-hit"
# Where this request's generations ran; one dict per HTTP request or RPC, shared by its tasks.
_placements: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("placements", default=None)


@dataclass(frozen=True)
class Servable:
    """An adapter the cluster serves by name (ListAdapters, /v1/models): loaded on first use, on
    whichever replica a request lands; `docs/scale-out.md` says where the replicas' metrics are."""

    name: str
    digest: str = ""
    max_rank: int = 0
    pinned: bool = False
    slot: int | None = None
    requests: int = 0


class RemoteLLM:
    """What `Server` asks of its engine, over the engine deployment: `stream`, the tokenizer, and
    the engine's configuration (read from a replica once)."""

    def __init__(self, handle: Any, tokenizer: Any, resolver: AdapterResolver, described: dict[str, Any]) -> None:
        self.handle, self.tokenizer, self.resolver = handle, tokenizer, resolver
        self._prefix = secrets.token_hex(4)  # request ids stay unique across front-door replicas
        self.engine = SimpleNamespace(executor=SimpleNamespace(config=described["model_config"]),
                                      config=described["engine_config"])

    async def stream(self, prompt: Prompt, params: SamplingParams, *, adapter: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[Any]:
        """One request's `TextDelta`s, from the replica Serve routes it to.

        Raises:
            AdapterNotFoundError: no resolver serves `adapter` (before any routing).
            EngineDeadError: the replica died, or none is available (UNAVAILABLE / 503).
            What the replica raised for the request (its QuadaptError, as it is).
        """
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
        from ray.serve.exceptions import DeploymentUnavailableError

        if adapter:
            self.resolver.resolve(adapter)
        call = self.handle.options(stream=True, multiplexed_model_id=adapter or "").generate.remote(
            prompt, params, adapter, f"{self._prefix}-{request_id}")
        finished = False
        try:
            async for item in call:
                if isinstance(item, Placement):
                    placed = _placements.get()
                    if placed is not None:
                        placed[REPLICA_HEADER] = item.replica
                        if item.adapter_hit is not None:
                            placed[HIT_HEADER] = "1" if item.adapter_hit else "0"
                    continue
                finished = item.finished
                yield item
        except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as e:
            raise EngineDeadError(f"the replica serving request {request_id} stopped before it finished "
                                  f"({type(e).__name__}); retry it, another replica serves it") from None
        except RayTaskError as e:
            if isinstance(e.cause, (QuadaptError, Refusal)):
                raise e.cause from None
            raise
        finally:
            if not finished:
                call.cancel()  # the replica aborts the request and frees its blocks


class ClusterServer(Server):
    """The single server's checks, queue, logs and metrics, over a `RemoteLLM`."""

    def __init__(self, config: ServerConfig, llm: RemoteLLM) -> None:
        super().__init__(config)
        self.llm = llm
        self._state = "serving"

    def adapter_versions(self) -> list[Any]:
        return [Servable(name) for name in self.llm.resolver.names()]

    async def load_adapter(self, name: str, path: str, *, pinned: bool = False) -> tuple[Any, str]:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                      "in a cluster adapters load on first use, by name, on the replica a request lands on; put "
                      "the adapter directory in an --adapter-dir shared by every replica instead")

    async def unload_adapter(self, name: str) -> None:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                      "in a cluster each replica unloads its least recently used adapter when its slots are full; "
                      "remove the directory from the --adapter-dir to stop serving it")

    def _engine_view(self) -> None:
        return None  # the engines are the replicas'; their metrics are Serve's (docs/scale-out.md)


class FrontDoor:
    """The ingress: HTTP (`__serve_build_asgi_app__`) and the Generation RPCs (one method each).
    Serve awaits its constructor, which waits for an engine replica to describe the engine.

    Args:
        config: what the cluster serves (the tokens, limits and adapter dirs of `ServerConfig`).
        engine: a handle to the engine deployment.
    """

    async def __init__(self, config: ServerConfig, engine: Any) -> None:
        from ...engine.args import open_with_tokenizer
        from ..rpc import Servicer

        _, tokenizer = open_with_tokenizer(config.model)
        described = await engine.describe.remote()
        resolver = AdapterResolver(config.adapters, config.adapter_dirs)
        self.server = ClusterServer(config, RemoteLLM(engine, tokenizer, resolver, described))
        self.servicer = Servicer(self.server)

    def __serve_build_asgi_app__(self) -> Any:
        from ..http_api import make_app

        return _with_placement_headers(make_app(self.server))

    async def Check(self, request: Any, grpc_context: Any) -> Any:
        """`grpc.health.v1.Health/Check`, as the single server answers it: SERVING for the whole
        server ("") and for the Generation service once the front door runs, else NOT_FOUND."""
        from grpc_health.v1 import health_pb2

        from ..rpc import SERVICE

        if request.service not in ("", SERVICE):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service[:128]!r}")
            raise LookupError(request.service)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def unary(self, name: str, request: Any, grpc_context: Any) -> Any:
        placed: dict[str, str] = {}
        _placements.set(placed)
        try:
            return await getattr(self.servicer, name)(_raw(request), _Context(grpc_context))
        finally:
            _trail(grpc_context, placed)

    async def streaming(self, name: str, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        placed: dict[str, str] = {}
        _placements.set(placed)
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        task = asyncio.ensure_future(getattr(self.servicer, name)(_raw(request), _Context(grpc_context, queue)))
        task.add_done_callback(lambda _: queue.put_nowait(done))
        last = None  # held back: Serve sends the context (trailing metadata) with each message
        try:
            while (message := await queue.get()) is not done:
                if last is not None:
                    yield last
                last = message
            task.result()  # the RPC's status, when it was aborted
            _trail(grpc_context, placed)
            if last is not None:
                yield last
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AbortError):
                await task


def _rpc(name: str, streams: bool) -> Callable[..., Any]:
    """A FrontDoor method named as the RPC, as Serve's gRPC proxy calls it (`grpc_context` by name)."""
    if streams:
        async def method(self: FrontDoor, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            async for message in self.streaming(name, request, grpc_context):
                yield message
    else:
        async def method(self: FrontDoor, request: Any, grpc_context: Any) -> Any:
            return await self.unary(name, request, grpc_context)
    method.__name__ = method.__qualname__ = name
    return method


for _name, _streams in (("Generate", False), ("GenerateStream", True), ("Tokenize", False), ("ListAdapters", False),
                        ("LoadAdapter", False), ("UnloadAdapter", False), ("ServerInfo", False)):
    setattr(FrontDoor, _name, _rpc(_name, _streams))


class _Context:
    """The part of `grpc.aio.ServicerContext` that `rpc.Servicer` uses, over Serve's gRPC context:
    an abort sets the status Serve's proxy answers with; a stream's writes go to `queue`."""

    def __init__(self, context: Any, queue: asyncio.Queue | None = None) -> None:
        self._context, self._queue = context, queue

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def time_remaining(self) -> float | None:
        return None  # Serve's proxy enforces the deadline

    async def write(self, message: Any) -> None:
        await self._queue.put(message)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise grpc.aio.AbortError(details)


def _raw(request: Any) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _trail(context: Any, placed: dict[str, str]) -> None:
    if placed:
        context.set_trailing_metadata([*context.trailing_metadata(), *placed.items()])


def _with_placement_headers(app: Any) -> Any:
    """The ASGI app, answering with the `x-quadapt-*` headers of where its generations ran."""

    @functools.wraps(app)
    async def tagged(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        placed: dict[str, str] = {}
        _placements.set(placed)

        async def send_tagged(message: Any) -> None:
            if message["type"] == "http.response.start" and placed:
                headers = [*message.get("headers", ()), *((k.encode(), v.encode()) for k, v in placed.items())]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_tagged)

    return tagged
