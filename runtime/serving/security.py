"""What the server checks before it acts, on either door: bearer tokens, adapter paths, TLS credentials.

- `authorize`: a request's `authorization: Bearer <token>` against the user and admin tokens,
  each compared in constant time (`hmac.compare_digest`); the admin token passes wherever the
  user token does, and LoadAdapter/UnloadAdapter take only it when one is set.
- `resolve_adapter_path`: a client-named adapter directory, by real path (symlinks and `..`
  resolved), must lie inside one of the allowed directories.
- `server_credentials`: TLS, or mutual TLS when a client CA is given.

A check that fails raises `Refusal` with the status code to answer; nothing here knows the
protocol's messages. Remaining exposure, by design: an operator who can write inside an allowed
directory can swap a path component for a symlink between the check and the read; the allowed
directories are the operator's to keep.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from ..errors import InvalidParameterError, quote


class Refusal(Exception):
    """A request the server refuses with a status code (auth, state, limits), not a QuadaptError."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def authorize(metadata: Sequence[tuple[str, Any]] | None, token: str | None, admin_token: str | None, *,
              admin: bool) -> None:
    """Check a request's bearer token.

    Args:
        metadata: the request's invocation metadata (gRPC), or its `authorization` header as
            `[("authorization", value)]` (HTTP).
        token: the user token every RPC needs; None: none needed.
        admin_token: the token admin RPCs need (and which passes everywhere); None: admin RPCs
            take `token`.
        admin: the request loads or unloads an adapter (LoadAdapter, UnloadAdapter, and their
            HTTP routes).

    Raises:
        Refusal: UNAUTHENTICATED for a missing or wrong token; PERMISSION_DENIED for the user
            token on an admin RPC that has an admin token.
    """
    if token is None and admin_token is None:
        return
    presented = _bearer(metadata)
    # Both comparisons always run, each in constant time.
    is_user = token is not None and hmac.compare_digest(presented, token.encode())
    is_admin = admin_token is not None and hmac.compare_digest(presented, admin_token.encode())
    if admin and admin_token is not None:
        if is_admin:
            return
        if is_user:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, "loading and unloading adapters (LoadAdapter, UnloadAdapter, "
                                                             "/v1/load_lora_adapter, /v1/unload_lora_adapter) need the admin token")
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token; send 'authorization: Bearer <token>'")
    if token is None or is_user or is_admin:
        return
    raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                  "missing or wrong token; send 'authorization: Bearer <token>' (gRPC metadata, or an HTTP header)")


def resolve_adapter_path(path: str, allowed: Sequence[Path]) -> Path:
    """The real path of an adapter directory named by a client, if it lies inside an allowed directory.

    A relative `path` is looked up in each allowed directory in turn. Symlinks and `..` are
    resolved first, so neither can lead outside (a symlink that stays inside is fine). The
    adapter is then read from the returned real path, not from the name the client gave.

    Args:
        path: what the client sent.
        allowed: the allowed directories, as real paths.

    Raises:
        Refusal: PERMISSION_DENIED when no allowed directory holds it (or none is configured),
            INVALID_ARGUMENT for an empty path or one holding a NUL character.
    """
    if not path:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "path is empty; name the adapter directory to load")
    if "\x00" in path:  # no file system path holds one; os.path would raise on it
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"path {quote(path)} holds a NUL character; name a directory")
    if not allowed:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            "this server loads no adapters at run time; start it with an adapter directory "
            "(quadapt serve --adapter-dir DIR; ServerConfig.adapter_dirs)",
        )
    candidates = [Path(path)] if os.path.isabs(path) else [d / path for d in allowed]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if any(real == d or real.is_relative_to(d) for d in allowed):
            return real
    raise Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        f"adapter path {quote(path)} is outside the server's adapter directories (symlinks and '..' resolved); "
        "put the adapter in one of them",
    )


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a certificate it signed.

    Raises:
        InvalidParameterError: a file that cannot be read.
    """

    def read(name: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise InvalidParameterError(f"cannot read {name} {path!r}: {e}") from None

    ca = read("tls_client_ca", client_ca) if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(read("tls_key", key), read("tls_cert", cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> bytes:
    """The token of an `authorization: Bearer <token>` header, or b"" (never equal to a token)."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer":
                return token.strip().encode()
    return b""
