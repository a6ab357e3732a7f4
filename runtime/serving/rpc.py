"""The `quadapt.v1.Generation` RPCs: the one boundary where protobuf meets the runtime.

Each RPC takes its request as bytes and parses it here (a malformed one is INVALID_ARGUMENT,
where grpc would answer UNKNOWN), checks the bearer token and the server's state, turns the
message into the runtime's types (`SamplingParams`, prompt text or chat messages, adapter names)
at its top and `TextDelta`s back into messages at its bottom, and maps errors to status codes: a
`QuadaptError` by its type (`server_requests.error_status`), with its message, which names the field, as the details.
The server object (`server.py`) owns the state, the engine and the logs; this file holds no
state. Requests are never logged with their text.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ...protos.quadapt.v1 import generation_pb2 as pb
from ...protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
from ..errors import QuadaptError
from ..api.outputs import TextDelta
from ..text.sampling_params import SamplingParams
from .requests import error_status
from .requests import request_prompt as shared_prompt
from .requests import request_sampling as shared_sampling
from .security import Refusal

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "quadapt.v1.Generation"
ADMIN_METHODS = frozenset({"LoadAdapter", "UnloadAdapter"})
# The optional sampling fields: an unset one takes SamplingParams' default (greedy, 128 new tokens).
_OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")

_OUTCOMES = {"loaded": pb.LoadAdapterResponse.OUTCOME_LOADED, "reloaded": pb.LoadAdapterResponse.OUTCOME_RELOADED,
             "unchanged": pb.LoadAdapterResponse.OUTCOME_UNCHANGED}
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
# The longest status message sent: a safety net under the bounded quotes of every message, since
# a message past gRPC's metadata limit reaches the client as RESOURCE_EXHAUSTED instead.
_MAX_STATUS_CHARS = 1024
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
    async def handler(self: Servicer, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.server.check_token(context.invocation_metadata(), admin=name in ADMIN_METHODS)
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {request_type.DESCRIPTOR.full_name} message (malformed protobuf, or "
                    "a string that is not UTF-8); build it with stubs generated from generation.proto",
                ) from None
            if name not in _ANY_STATE:
                self.server.check_serving()
            response = await method(self, request, context)
        except Refusal as e:
            code, message = e.code, str(e)
        except QuadaptError as e:
            code, message = error_status(e), str(e)
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
        self.server.log_refusal(name, code, peer(context) + peer_request_id(context), message)
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


def add_servicer(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the Generation RPCs as the generated `add_GenerationServicer_to_server` does, but
    taking the request's bytes, so that `_rpc` parses them and answers a malformed one itself
    (grpc would answer UNKNOWN). Ray Serve's gRPC proxy registers the service through it too
    (`quadapt serve --ray`), with a stand-in servicer, and forwards the bytes to the front door."""
    handlers = {}
    for name, (_, response_type, streams) in _METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=None,
                              response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class Servicer(pb_grpc.GenerationServicer):
    """The Generation RPCs; each converts the proto at its top and bottom and holds no state."""

    def __init__(self, server: Any) -> None:
        # `server.Server`, which imports this module: its state, engine, checks and logs.
        self.server = server

    @_rpc(pb.GenerateRequest)
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async with self._generation(request, context) as generation:
            async for delta in generation:
                response.text += delta.text
                response.token_ids.extend(delta.token_ids)
                if delta.finished:
                    _finish(response, delta)
            response.request_id = generation.request_id
        return response

    @_rpc(pb.GenerateRequest)
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async with self._generation(request, context) as generation:
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
        prompt = request_prompt(request, llm.tokenizer)
        context_tokens = llm.engine.executor.config.max_position_embeddings

        def tokenize() -> pb.TokenizeResponse:
            ids = llm.tokenizer.encode_prompt(prompt, max_tokens=context_tokens)  # checks the size before it renders
            text = prompt if isinstance(prompt, str) else llm.tokenizer.apply_chat_template(prompt)
            return pb.TokenizeResponse(token_ids=ids, text=text)

        return await asyncio.to_thread(tokenize)

    @_rpc(pb.ListAdaptersRequest)
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[_adapter_info(v) for v in self.server.adapter_versions()])

    @_rpc(pb.LoadAdapterRequest)
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        version, outcome = await self.server.load_adapter(request.name, request.path, pinned=request.pinned)
        return pb.LoadAdapterResponse(adapter=_adapter_info(version), outcome=_OUTCOMES[outcome])

    @_rpc(pb.UnloadAdapterRequest)
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        await self.server.unload_adapter(request.name)
        return pb.UnloadAdapterResponse()

    @_rpc(pb.ServerInfoRequest)
    async def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        if self.server.llm is None:
            self.server.check_serving()  # loading, or failed to load: nothing to describe yet
        config, engine = self.server.config, self.server.llm.engine
        model_config = engine.executor.config
        try:
            version = importlib.metadata.version("quadapt")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return pb.ServerInfoResponse(
            model=self.server.model_id,
            version=version,
            max_context_tokens=model_config.max_position_embeddings,
            vocab_size=model_config.vocab_size,
            chat_template=self.server.llm.tokenizer.chat_template is not None,
            max_queue=config.max_queue,
            max_batch=engine.config.max_num_seqs,
            max_loras=engine.config.max_loras,
            max_lora_rank=engine.config.max_lora_rank,
            max_message_bytes=config.max_message_bytes,
            state=_STATES.get(self.server.state, pb.SERVER_STATE_UNSPECIFIED),
        )


    def _generation(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        """Admit one Generate(Stream) request through the server, as the HTTP API admits its own."""
        remaining = context.time_remaining
        return self.server.generation(
            request_prompt(request, self.server.llm.tokenizer), request_sampling(request), request.adapter or None,
            who=peer_request_id(context), deadline_passed=lambda: remaining() is not None and remaining() <= 0,
        )


_STATES = {"serving": pb.SERVER_STATE_SERVING, "draining": pb.SERVER_STATE_DRAINING, "failed": pb.SERVER_STATE_FAILED}


# -- proto <-> runtime ----------------------------------------------------------------------


def request_prompt(request: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Any) -> str | list[dict[str, str]]:
    """The prompt text, or the chat messages, of a request; exactly one must be given (`server_requests`)."""
    return shared_prompt(request.prompt, request.messages, tokenizer)


def request_sampling(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling settings; an unset field takes SamplingParams' default, which names a bad one."""
    settings: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_SAMPLING if request.HasField(name)}
    return shared_sampling(settings, request.stop, ignore_eos=request.ignore_eos)


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


def peer(context: grpc.aio.ServicerContext) -> str:
    """The client's address as grpc reports it (e.g. `ipv4:127.0.0.1:50544`), printable and short."""
    return "".join(c for c in str(context.peer())[:128] if c.isprintable())


def peer_request_id(context: grpc.aio.ServicerContext) -> str:
    """` x-request-id=<id>` when the client sent one (for matching logs), printable and short."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            clean = "".join(c for c in str(value)[:64] if c.isprintable())
            return f" x-request-id={clean!r}"
    return ""
