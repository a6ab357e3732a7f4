"""`quadapt serve` (the gRPC server, with an optional HTTP front door) and `quadapt client`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .options import (
    adapter_spec, engine_args, engine_options, model_options, named_adapters, positive_int, prompt_of,
    prompt_options, run_options, sampling_options, sampling_settings, server_port,
)

logger = logging.getLogger(__name__)


def listen_port(value: str) -> int:
    """argparse type: a TCP port to listen on, 0-65535 (0: any free port)."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0-65535 (0: any free port), got {value!r}")
    return number


# The most replicas a flag may ask for: Ray Serve takes a 32-bit count, and no cluster runs more.
MAX_REPLICAS = 10_000


def replica_count(value: str) -> int:
    """argparse type: a whole number of replicas, 1 .. MAX_REPLICAS."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_REPLICAS}, got {value!r}")
    return count


def min_max(value: str) -> tuple[int, int]:
    """argparse type: MIN:MAX, two integers with 0 <= MIN <= MAX, 1 <= MAX <= MAX_REPLICAS."""
    low, _, high = value.partition(":")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = (-1, -1)
    if not 0 <= bounds[0] <= bounds[1] or not 1 <= bounds[1] <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(
            f"must be MIN:MAX with 0 <= MIN <= MAX and 1 <= MAX <= {MAX_REPLICAS}, e.g. 1:4; got {value!r}"
        )
    return bounds


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `client` to `sub`."""
    srv = sub.add_parser(
        "serve",
        parents=[
            model_options("checkpoint directory or .gguf file to serve"), run_options(),
            engine_options("adapter slots (distinct adapters in one batch; default: 4, or one per --adapter)"),
        ],
        help="serve generations over gRPC (quadapt.v1.Generation), each request naming its adapter",
        description=(
            "Serve the model over gRPC until SIGTERM or Ctrl-C, which drain: in-flight requests finish (within "
            "--drain-timeout), new ones get UNAVAILABLE. Also serves grpc.health.v1 and server reflection. The "
            "protocol is protos/quadapt/v1/generation.proto. With --http-port, the same engine also answers the "
            "OpenAI-compatible HTTP API (docs/http.md)."
        ),
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=listen_port, default=50051, help="port (default 50051; 0: any free port, logged)")
    srv.add_argument(
        "--adapter", type=adapter_spec, action="append", default=[], metavar="NAME=PATH",
        help="load the PEFT LoRA adapter directory PATH as NAME at start (repeatable)",
    )
    srv.add_argument(
        "--adapter-dir", action="append", default=[], metavar="DIR",
        help="a directory LoadAdapter may read adapters from (repeatable; without one, LoadAdapter is refused)",
    )
    srv.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                     help="most requests waiting or running; one more gets RESOURCE_EXHAUSTED (default 64)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    http = srv.add_argument_group("HTTP")
    http.add_argument("--http-port", type=listen_port, default=None, metavar="P",
                      help="also serve the OpenAI-compatible HTTP API on this port, with the same tokens and TLS "
                           "(0: any free port, logged; default: no HTTP)")
    http.add_argument("--http-host", default=None, metavar="H",
                      help="address the HTTP API listens on (default: the same as --host)")
    cluster = srv.add_argument_group("replicas on Ray Serve (docs/scale-out.md; needs pip install 'quadapt[ray]')")
    cluster.add_argument("--ray", action="store_true",
                         help="serve through Ray Serve: engine replicas behind Serve's HTTP (--http-port, default "
                              "8000) and gRPC (--port) proxies, each request routed to a replica holding its adapter; "
                              "adapters load on first use from --adapter-dir")
    scale = cluster.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=replica_count, default=None, metavar="N",
                       help="engine replicas (with --ray; default 1)")
    scale.add_argument("--autoscale", type=min_max, default=None, metavar="MIN:MAX",
                       help="let Serve scale the replicas between MIN and MAX on the requests in flight (with --ray)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="join this Ray cluster (e.g. auto, ray://head:10001) instead of starting one here")
    security = srv.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="F", help="PEM certificate chain of the server (TLS; with --tls-key)")
    security.add_argument("--tls-key", metavar="F", help="PEM private key of the server")
    security.add_argument("--tls-client-ca", metavar="F", help="PEM CA that client certificates must chain to (mutual TLS)")
    security.add_argument("--token-file", metavar="F", help="a file holding the bearer token every request must send")
    security.add_argument("--admin-token-file", metavar="F",
                          help="a file holding the token LoadAdapter and UnloadAdapter need (default: the bearer token)")
    metrics = srv.add_argument_group("metrics")
    metrics.add_argument("--metrics-port", type=listen_port, default=None, metavar="P",
                         help="serve Prometheus metrics (GET /metrics, plain HTTP) on this port (default: none)")
    metrics.add_argument("--metrics-host", default=None, metavar="H",
                         help="address the metrics endpoint listens on, whatever --host is (default 127.0.0.1: this "
                              "machine only; the metrics name the adapters)")
    metrics.add_argument("--metrics-require-token", action="store_true",
                         help="a scrape must send 'Authorization: Bearer <token>' with the --token-file (or "
                              "--admin-token-file) token, else 401")
    srv.set_defaults(handler=_serve)

    cli = sub.add_parser(
        "client",
        help="call a running quadapt server from the shell",
        description="Call a quadapt server: generate (streamed to stdout), adapters, load-adapter, unload-adapter, info.",
    )
    where = cli.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="the server (default: --host and --port, 127.0.0.1:50051)")
    where.add_argument("--port", type=server_port, default=None, metavar="P",
                       help="the server's port on --host, as `serve --port` names it (default 50051)")
    cli.add_argument("--host", default=None, metavar="H", help="the server's host, with --port (default 127.0.0.1)")
    cli.add_argument("--token-file", metavar="F", help="a file holding the bearer token to send")
    cli.add_argument("--tls", action="store_true", help="connect with TLS (implied by the --tls-* files)")
    cli.add_argument("--tls-ca", metavar="F", help="PEM CA to trust (default: the system's)")
    cli.add_argument("--tls-cert", metavar="F", help="PEM certificate of this client (mutual TLS)")
    cli.add_argument("--tls-key", metavar="F", help="PEM key of this client (mutual TLS)")
    cli.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline of the call in seconds")
    cli.add_argument("--wait", type=float, default=0, metavar="S",
                     help="first wait up to S seconds for the server to be serving (it loads the model at start)")
    actions = cli.add_subparsers(dest="action", required=True, metavar="ACTION")
    call = actions.add_parser(
        "generate", parents=[prompt_options(), sampling_options(server_defaults=True)],
        help="generate, streaming the text to stdout",
    )
    call.add_argument("--adapter", default=None, metavar="NAME", help="a loaded adapter (default: the base model)")
    actions.add_parser("adapters", help="list the loaded adapters, one JSON object a line")
    load = actions.add_parser("load-adapter", help="load (or reload) an adapter from the server's --adapter-dir")
    load.add_argument("name")
    load.add_argument("path", help="the adapter directory, on the server, inside one of its --adapter-dir")
    load.add_argument("--pin", action="store_true", help="keep it in its slot")
    unload = actions.add_parser("unload-adapter", help="unload an adapter no request uses")
    unload.add_argument("name")
    actions.add_parser("info", help="the server's model, limits and version, as JSON")
    cli.set_defaults(handler=_client)


def _serve(args: argparse.Namespace) -> int:
    from ..runtime.errors import InvalidParameterError
    from ..runtime.serving.server import ServerConfig, read_secret, serve

    if args.ray:  # before the model or Ray is touched
        from ..runtime.serving.ray.launch import check_ray

        check_ray()
    config = ServerConfig(
        host=args.host, port=args.port, adapter_dirs=tuple(args.adapter_dir), max_queue=args.max_queue,
        drain_timeout_s=args.drain_timeout, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token=read_secret(args.token_file) if args.token_file else None,
        admin_token=read_secret(args.admin_token_file, "admin token file") if args.admin_token_file else None,
        metrics_port=args.metrics_port, metrics_token=args.metrics_require_token,
        **({"metrics_host": args.metrics_host} if args.metrics_host is not None else {}),  # else ServerConfig's
        http_port=args.http_port, http_host=args.http_host,
        **engine_args(args, named_adapters(args.adapter)),
    )
    if not args.ray:
        if args.replicas is not None or args.autoscale is not None or args.ray_address is not None:
            raise InvalidParameterError("--replicas, --autoscale and --ray-address go with --ray; add it, or drop them")
        serve(config)
        return 0
    from ..runtime.serving.ray.launch import run

    def ready(http: str, grpc_address: str) -> None:
        print(f"serving {config.model} on Ray Serve: OpenAI-compatible HTTP at {http}, gRPC (quadapt.v1.Generation) "
              f"at {grpc_address}; SIGTERM or Ctrl-C undeploys", flush=True)

    run(config, replicas=args.replicas if args.autoscale is None else None, autoscale=args.autoscale,
        ray_address=args.ray_address, on_ready=ready)
    return 0


def _client(args: argparse.Namespace) -> int:
    from ..runtime.serving.client import Client
    from ..runtime.errors import InvalidParameterError
    from ..runtime.serving.server import read_secret

    if args.address is not None and args.host is not None:
        raise InvalidParameterError("--address names the host already; give --address HOST:PORT, or --host and --port")
    if args.host is not None and not args.host.strip():
        raise InvalidParameterError("--host is empty; give the server's host name or address, or leave it out")
    messages = prompt = None
    if args.action == "generate":  # the prompt's checks before any call
        given = prompt_of(args)
        prompt, messages = (given, None) if isinstance(given, str) else (None, given)
    token = read_secret(args.token_file) if args.token_file else None
    if args.address is None:
        host = args.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        args.address = f"{host}:{args.port if args.port is not None else 50051}"
    with Client(
        args.address, token=token, tls=args.tls, ca_cert=args.tls_ca, client_cert=args.tls_cert,
        client_key=args.tls_key, timeout=args.timeout,
    ) as client:
        if args.wait:
            _wait_until_serving(client, args.wait, args.address)
        if args.action == "generate":
            # Only the flags given: the server applies the same defaults to the others.
            settings = {k: v for k, v in sampling_settings(args).items() if v is not None}
            settings.update(stop=args.stop or None, ignore_eos=args.ignore_eos or None)
            for chunk in client.generate_stream(prompt, messages=messages, adapter=args.adapter, **settings):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finished:
                    logger.info("%s after %d tokens", chunk.finish_reason, chunk.completion_tokens)
            sys.stdout.write("\n")
        elif args.action == "adapters":
            for info in client.list_adapters():
                print(json.dumps(info.__dict__))
        elif args.action == "load-adapter":
            info, _ = client.load_adapter(args.name, args.path, pinned=args.pin)
            print(json.dumps(info.__dict__))
        elif args.action == "unload-adapter":
            client.unload_adapter(args.name)
        else:
            print(json.dumps(client.server_info().__dict__))
    return 0


def _wait_until_serving(client, seconds: float, address: str) -> None:
    """Poll the server's health until it says SERVING (it loads the model at start), for up to `seconds`."""
    import time

    from ..runtime.serving.client import ServerError
    from ..runtime.errors import QuadaptError

    deadline = time.monotonic() + seconds
    status = "no answer"
    while time.monotonic() < deadline:
        try:
            status = client.health()
        except ServerError as e:
            status = e.code
        if status == "SERVING":
            return
        time.sleep(0.5)
    raise QuadaptError(f"the server at {address} is not serving after {seconds:g} s (last: {status}); is it running?")
