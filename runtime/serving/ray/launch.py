"""Deploying the cluster: `build_app` makes the Serve application, `run` starts or joins Ray, deploys
it, and undeploys it on SIGTERM or SIGINT.

The application is two deployments: `QuadaptEngine` (the replicas, `replica.py`), N of them or
autoscaled between two bounds on the requests in flight, and `QuadaptFront` (the ingress,
`front.py`), which is light (a tokenizer, no weights). Serve's HTTP proxy answers on
`ServerConfig.http_port` (8000 when unset) and its gRPC proxy, with the Generation service, on
`ServerConfig.port`; with `metrics_port` P, each engine replica serves its `/metrics` on P plus
its rank on its node. What Serve's proxies do not do (TLS) is refused by name rather than
ignored: TLS ends at the cluster's ingress (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from ...errors import InvalidParameterError
from ..config import ServerConfig

logger = logging.getLogger(__name__)

APP_NAME = "quadapt"
# What Serve's gRPC proxy registers (by import path, in the proxy's process): the single server's
# registration, which hands the front door each request's bytes (the generated one would parse
# them in the proxy and pickle the message to the replica, by a module path that is not
# importable), and the standard health service, which the front door answers.
GRPC_SERVICERS = ["quadapt.runtime.serving.rpc.add_servicer",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
DEFAULT_HTTP_PORT = 8000
MISSING_EXTRA = "serving on Ray needs the ray extra: pip install 'quadapt[ray]'"


def check_ray() -> None:
    """Raise InvalidParameterError naming the extra when Ray Serve is not installed."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise InvalidParameterError(MISSING_EXTRA) from None


def check_config(config: ServerConfig, replicas: int | None, autoscale: tuple[int, int] | None) -> None:
    """Refuse what a cluster cannot honour, before Ray starts.

    Raises:
        InvalidParameterError: TLS, port 0 for a proxy, or a bad replica count.
    """
    if config.tls_cert is not None:
        raise InvalidParameterError("--ray serves through Ray Serve's proxies, which end no TLS; terminate TLS at the "
                                    "cluster's ingress (a load balancer, a Kubernetes Ingress) and drop --tls-*")
    for name, port in (("--port", config.port), ("--http-port", config.http_port)):
        if port == 0:
            raise InvalidParameterError(f"{name} 0 (any free port) is not available with --ray: Serve's proxies "
                                        "listen on fixed ports; give a port number")
    if replicas is not None and autoscale is not None:
        raise InvalidParameterError("give --replicas N or --autoscale MIN:MAX, not both")
    if replicas is not None and replicas < 1:
        raise InvalidParameterError(f"--replicas must be >= 1, got {replicas}")
    if autoscale is not None and not 0 <= autoscale[0] <= autoscale[1] or autoscale == (0, 0):
        raise InvalidParameterError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {autoscale}")


def build_app(config: ServerConfig, *, replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
              replica_cpus: float | None = None) -> Any:
    """The Serve application: the front door bound to the engine deployment.

    Args:
        config: what to serve; its engine fields size each replica.
        replicas: a fixed number of engine replicas (ignored with `autoscale`).
        autoscale: (min, max) replicas; Serve scales on the requests in flight, aiming at a full
            batch (`max_num_seqs`) per replica.
        replica_cpus: the CPUs Ray reserves per replica; None: the engine's threads.
    """
    from ray import serve

    from ...engine.args import default_threads
    from .front import FrontDoor
    from .replica import engine_deployment

    check_config(config, None if autoscale else replicas, autoscale)
    if autoscale is not None:
        scale: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": autoscale[0], "max_replicas": autoscale[1],
            "target_ongoing_requests": config.max_num_seqs}}
    else:
        scale = {"num_replicas": replicas or 1}
    cpus = replica_cpus if replica_cpus is not None else config.threads or default_threads()
    engine = serve.deployment(
        engine_deployment(config), name="QuadaptEngine", max_ongoing_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.drain_timeout_s, ray_actor_options={"num_cpus": cpus}, **scale,
    )
    front = serve.deployment(serve.ingress()(FrontDoor), name="QuadaptFront", max_ongoing_requests=config.max_queue,
                             ray_actor_options={"num_cpus": 0})
    return front.bind(config, engine.bind(config))


def run(config: ServerConfig, *, replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
        ray_address: str | None = None, on_ready: Callable[[str, str], None] = lambda http, grpc: None,
        stop: threading.Event | None = None) -> None:
    """Start a local Ray instance (or join `ray_address`), deploy, and serve until SIGTERM or SIGINT
    (or `stop`), then undeploy: the application is deleted, and a Ray instance started here stops.

    Args:
        config, replicas, autoscale: as `build_app`'s.
        ray_address: a running cluster ("auto", "ray://head:10001", ...); None starts one here.
        on_ready: called with the HTTP base URL and the gRPC address once the replicas serve.
        stop: set it to stop (tests); None waits for a signal.

    Raises:
        InvalidParameterError: the ray extra is missing, or a setting a cluster cannot honour.
    """
    check_ray()
    check_config(config, None if autoscale else replicas, autoscale)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    started_here = ray_address is None
    # "local": a new instance even where a cluster runs on this machine (ray.init's default would
    # join the last one `ray start` made, and shut down Serve on it at the end).
    ray.init(address=ray_address or "local", include_dashboard=False if started_here else None,
             log_to_driver=False)
    handlers = {}
    if stop is None:
        stop = threading.Event()
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        host = config.http_host or config.host
        http_port = config.http_port if config.http_port is not None else DEFAULT_HTTP_PORT
        serve.start(http_options=HTTPOptions(host=host, port=http_port),
                    grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(build_app(config, replicas=replicas, autoscale=autoscale), name=APP_NAME, route_prefix="/")
        on_ready(f"http://{host}:{http_port}/v1", f"{config.host}:{config.port}")
        stop.wait()
        logger.info("undeploying %s", APP_NAME)
        serve.delete(APP_NAME)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if started_here:
            serve.shutdown()
            ray.shutdown()


def config_from_args(args: dict[str, Any]) -> tuple[ServerConfig, int | None, tuple[int, int] | None]:
    """A Serve config file's application `args` (a RayService's `serveConfigV2`): `ServerConfig`'s
    fields by name, plus `replicas` (N) or `autoscale` ([MIN, MAX]).

    Raises:
        InvalidParameterError: an unknown field (named, with the known ones), or one
            `ServerConfig` refuses.
    """
    args = dict(args)
    replicas, autoscale = args.pop("replicas", None), args.pop("autoscale", None)
    known = set(ServerConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidParameterError(f"unknown application arg(s) {unknown}; the args are replicas, autoscale and "
                                    f"ServerConfig's fields: {', '.join(sorted(known))}")
    if "adapter_dirs" in args:
        args["adapter_dirs"] = tuple(args["adapter_dirs"])
    if autoscale is not None:
        autoscale = tuple(autoscale)
    config = ServerConfig(**args)
    check_config(config, replicas, autoscale)
    return config, replicas, autoscale


def app(args: dict[str, Any]) -> Any:
    """The application builder a Serve config file names (`import_path:
    quadapt.runtime.serving.ray.launch:app`, its `args` as `config_from_args` reads them); the ports
    are the config file's `http_options` and `grpc_options` (docs/scale-out.md)."""
    config, replicas, autoscale = config_from_args(args)
    return build_app(config, replicas=replicas, autoscale=autoscale)
