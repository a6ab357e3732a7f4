"""What the gRPC server serves and how: `ServerConfig`, token files, and loading the model behind an engine.

`ServerConfig` is plain, validated data (no file is read and no port bound when one is made);
`load_llm` does the slow part through `build_engine`, as every front door does. `server.py`
runs it.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from dataclasses import dataclass, field
from typing import Literal

from ..engine.args import EngineArgs, build_engine
from ..errors import InvalidParameterError
from ..api.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """How to serve a model. Only `model` is required.

    Attributes:
        model: the checkpoint directory or `.gguf` file to serve.
        host, port: where to listen (port 0: any free port; `Server.port` says which). The
            default host answers this machine only; "0.0.0.0" or "[::]" listen on every interface.
        adapters: adapters to load at start, name -> PEFT directory (the operator's, so not
            limited to `adapter_dirs`).
        adapter_dirs: directories LoadAdapter may read adapters from; empty refuses every
            LoadAdapter call.
        max_queue: the most generation requests waiting or running at once; one more is
            RESOURCE_EXHAUSTED.
        max_message_bytes: the largest request (and response) message, in bytes.
        drain_timeout_s: on SIGTERM, how long in-flight requests may take to finish before they
            are cancelled.
        tls_cert, tls_key: PEM files of the server's certificate chain and key (TLS).
        tls_client_ca: PEM file of the CA that client certificates must chain to (mutual TLS;
            needs tls_cert).
        token: the bearer token every Generation RPC needs (`authorization: Bearer <token>`);
            None: no token.
        admin_token: the token LoadAdapter and UnloadAdapter need (it also passes wherever
            `token` does); None: they take `token`.
        metrics_port: serve Prometheus metrics (`GET /metrics`, plain HTTP) on this port (0: any
            free port); None: no endpoint.
        metrics_host: where the metrics endpoint listens, whatever `host` is: the default answers
            this machine only. The metrics name the adapters, so widen it (e.g. "0.0.0.0") only
            for a private network or with `metrics_token`.
        metrics_token: require `token` (or `admin_token`) on /metrics, as `Authorization: Bearer
            <token>`; a scrape without it gets 401. Needs a token and `metrics_port`.
        http_port: also serve the OpenAI-compatible HTTP API (`/v1/chat/completions`, ...; see
            docs/http.md) on this port, over the same engine, tokens and TLS (0: any free port);
            None: gRPC only.
        http_host: where the HTTP API listens; None: the same host as gRPC.
        model_name: the name ServerInfo reports (default: the checkpoint's file or folder name).
        dtype, device, threads, max_num_seqs, max_num_batched_tokens, max_loras, max_lora_rank,
            kv_cache_bytes, block_size, executor: what `EngineArgs` says of them, with its defaults.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_dirs: tuple[str, ...] = ()
    max_queue: int = 64
    max_message_bytes: int = 4 * 2**20
    drain_timeout_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_token: bool = False
    http_port: int | None = None
    http_host: str | None = None
    model_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = EngineArgs.dtype
    device: str = EngineArgs.device
    threads: int | None = EngineArgs.threads
    max_num_seqs: int = EngineArgs.max_num_seqs
    max_num_batched_tokens: int = EngineArgs.max_num_batched_tokens
    max_loras: int | None = EngineArgs.max_loras
    max_lora_rank: int | None = EngineArgs.max_lora_rank
    kv_cache_bytes: int = EngineArgs.kv_cache_bytes
    block_size: int = EngineArgs.block_size
    executor: Literal["auto", "torch", "onnx"] = EngineArgs.executor

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "adapters", {str(k): str(v) for k, v in dict(self.adapters).items()})
        object.__setattr__(self, "adapter_dirs", tuple(str(d) for d in self.adapter_dirs))
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 65535):
                raise InvalidParameterError(f"{name} must be a port number in [0, 65535] (0: any free port), got {value!r}")
        for name in ("max_queue", "max_message_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.drain_timeout_s >= 0:
            raise InvalidParameterError(f"drain_timeout_s must be >= 0 seconds, got {self.drain_timeout_s!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidParameterError("tls_cert and tls_key go together: give both (TLS) or neither (plaintext)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidParameterError("tls_client_ca (mutual TLS) needs the server's own tls_cert and tls_key")
        for name in ("token", "admin_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or value != value.strip()):
                raise InvalidParameterError(f"{name} must be a non-empty string without surrounding whitespace")
        if self.token is not None and self.token == self.admin_token:
            raise InvalidParameterError("token and admin_token are the same; give the admin its own token")
        if not isinstance(self.metrics_host, str) or not self.metrics_host.strip("[] "):
            raise InvalidParameterError(
                f"metrics_host (--metrics-host) must be an address to listen on (e.g. 127.0.0.1), got {self.metrics_host!r}"
            )
        if self.http_host is not None and (not isinstance(self.http_host, str) or not self.http_host.strip("[] ")):
            raise InvalidParameterError(
                f"http_host (--http-host) must be an address to listen on (e.g. 127.0.0.1), got {self.http_host!r}; "
                "leave it unset to use the gRPC host"
            )
        if self.http_port and self.http_port == self.port:
            raise InvalidParameterError(f"http_port (--http-port) {self.http_port} is the gRPC port too; give it its own")
        if not isinstance(self.metrics_token, bool):
            raise InvalidParameterError(f"metrics_token must be True or False, got {self.metrics_token!r}")
        if self.metrics_token and self.token is None and self.admin_token is None:
            raise InvalidParameterError("metrics_token (--metrics-require-token) requires the server's token on "
                                        "/metrics, but no token (--token-file) or admin_token (--admin-token-file) "
                                        "is set; set one, or leave metrics_token off")
        if self.metrics_token and self.metrics_port is None:
            raise InvalidParameterError("metrics_token protects the metrics endpoint, but metrics_port is None "
                                        "(no endpoint); set metrics_port")
        self.engine_args()  # checks the engine's settings

    def engine_args(self) -> EngineArgs:
        """What `load_llm` builds the engine from: the model, the start-up adapters and the limits."""
        return EngineArgs(
            model=self.model, adapters=self.adapters, dtype=self.dtype, threads=self.threads,
            kv_cache_bytes=self.kv_cache_bytes, block_size=self.block_size, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank, executor=self.executor, device=self.device,
        )

    @property
    def metrics_tokens(self) -> tuple[str, ...]:
        """The tokens a scrape of /metrics may send, any one of them; empty: none needed."""
        if not self.metrics_token:
            return ()
        return tuple(t for t in (self.token, self.admin_token) if t is not None)


def read_secret(path: str | os.PathLike[str], what: str = "token file") -> str:
    """A token from a file: its text without surrounding whitespace (a final newline is usual).

    On a POSIX system, a file that its group or others may read, write or run is reported (a
    WARNING naming the file and `chmod 600`), then read all the same.

    Args:
        path: the file.
        what: how messages name it ("token file", "admin token file").

    Returns:
        The token.

    Raises:
        InvalidParameterError: the file cannot be read or holds nothing.
    """
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode  # of the file read, not of a path that may change
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read the {what} {str(path)!r}: {e}") from None
    if os.name == "posix" and mode & 0o077:
        logger.warning("the %s %r grants its group or others access (mode %04o); restrict it with: chmod 600 %s",
                       what, str(path), stat.S_IMODE(mode), shlex.quote(str(path)))
    if not secret:
        raise InvalidParameterError(f"the {what} {str(path)!r} is empty; write the token into it")
    return secret


def load_llm(config: ServerConfig) -> AsyncLLM:
    """The model, tokenizer, engine and start-up adapters of `config`, behind an `AsyncLLM` (not started).

    Raises:
        CheckpointError, ConfigError, UnsupportedError: a checkpoint quadapt cannot serve.
        AdapterError, UnsupportedError: a start-up adapter that does not fit (checked before the weights load).
    """
    engine, tokenizer, _ = build_engine(config.engine_args())
    return AsyncLLM.from_engine(engine, tokenizer)
