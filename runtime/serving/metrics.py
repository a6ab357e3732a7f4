"""The gRPC server's Prometheus metrics: the engine's `MetricsSnapshot`, and per-request latencies.

What a scrape reads: gauges (requests waiting and running per adapter, KV blocks used and
total, adapters loaded, decode throughput) and counters (requests finished and aborted,
preemptions, prompt and generated tokens, adapter slot loads and evictions) come from the
engine's snapshot at scrape time; histograms of time to first token, inter-token latency and
request duration are fed by the server as each request streams, labelled by adapter ("" is the
base model), and a counter of RPCs by method and status code (HTTP requests by route and status).
`quadapt_lora_requests_info` is the gauge the Kubernetes inference gateway reads for LoRA
affinity (vLLM's `vllm:lora_requests_info` under quadapt's name; see docs/http.md). Every metric lives in this
object's own registry, not the process's global one, so several servers (tests) can run in one
process.

`serve_http` serves `GET /metrics` and nothing else (any other path is 404) over plain HTTP on a
port of its own, from a daemon thread; given tokens, a scrape must send `Authorization: Bearer
<token>` (else 401). prometheus_client's own `start_http_server` has no authentication, hence
this small server. There is no TLS: keep the port on loopback (the server's default) or a
private network. This file holds no policy about requests; `server.py` decides what to record.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidParameterError, quote
from ..engine.metrics import MetricsSnapshot
from ..api.outputs import TextDelta

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

# Seconds. TTFT on a CPU can reach seconds under load; inter-token latency is milliseconds on a
# GPU and tens of milliseconds on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# A snapshot of the engine, the names of the loaded adapters and the adapter slots; None while the
# model loads.
EngineView = Callable[[], tuple[MetricsSnapshot, list[str], int] | None]


class ServerMetrics:
    """The server's metrics registry; `serve_http` exposes it.

    Args:
        engine_view: returns the engine's snapshot and the loaded adapters' names at scrape
            time, or None when there is no engine yet.
    """

    def __init__(self, engine_view: EngineView) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        self.time_to_first_token = Histogram(
            "quadapt_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.",
            ["adapter"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "quadapt_inter_token_latency_seconds", "Time between a request's consecutive generated tokens.",
            ["adapter"], buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.request_duration = Histogram(
            "quadapt_request_duration_seconds", "Time from a generation request's arrival to its end.",
            ["adapter"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.rpcs = Counter(
            "quadapt_grpc_requests", "gRPC calls of the Generation service, by method and status code.",
            ["method", "code"], registry=self.registry,
        )
        self.http_requests = Counter(
            "quadapt_http_requests", "HTTP requests of the OpenAI-compatible API, by route and status.",
            ["route", "status"], registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_view))
        self._http: _MetricsHTTPServer | None = None
        self.port: int | None = None

    def serve_http(self, host: str, port: int, tokens: Sequence[str] = ()) -> int:
        """Serve `/metrics` on `host:port` from a daemon thread until `close`.

        Args:
            host: the address to listen on ("127.0.0.1": this machine only; "0.0.0.0" or "::":
                every interface).
            port: the port; 0: any free port.
            tokens: the bearer tokens a scrape may send (`Authorization: Bearer <token>`), any
                one of them; empty: no token needed.

        Returns:
            The bound port (also `self.port`).

        Raises:
            InvalidParameterError: `host:port` cannot be bound (a port in use, an unknown host).
        """
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            self._http = _MetricsHTTPServer((host, port), family, self.registry, tokens)
        except OSError as e:
            raise InvalidParameterError(f"cannot serve metrics on {host}:{port}: {e}; is the port free and the host one of this machine's addresses?") from None
        threading.Thread(target=self._http.serve_forever, name="quadapt-metrics", daemon=True).start()
        self.port = self._http.server_address[1]
        logger.info("metrics on http://%s:%d/metrics (%s)", host, self.port,
                    "bearer token required" if tokens else "no token")
        return self.port

    def close(self) -> None:
        """Stop the `/metrics` endpoint, if it runs, and free its port."""
        if self._http is not None:
            self._http.shutdown()  # returns once serve_forever has returned
            self._http.server_close()
            self._http = None


class _MetricsHTTPServer(ThreadingHTTPServer):
    """`/metrics` of one registry, each request on a daemon thread; `tokens` empty: no auth."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, registry: CollectorRegistry, tokens: Sequence[str]) -> None:
        self.address_family = family  # read by TCPServer.__init__ when it makes the socket
        self.registry = registry
        self._tokens = [t.encode() for t in tokens]
        super().__init__(address, _MetricsHandler)

    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries one of the tokens (each compared in constant time)."""
        if not self._tokens:
            return True
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # http.server decodes headers as latin-1, so this gives back the bytes that were sent.
        sent = presented.strip().encode("latin-1", "replace")
        return any([hmac.compare_digest(sent, token) for token in self._tokens])  # no short cut: compare all

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the traceback to stderr. What lands here is the connection's
        # (a client gone mid-reply), not the server's: a scrape's own failure is logged in do_GET.
        logger.debug("metrics: request from %s failed", client_address[0], exc_info=True)


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"not found; the metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        if not self.server.authorized(self.headers.get("Authorization")):
            self._reply(401, b"missing or wrong token; send 'Authorization: Bearer <token>'\n",
                        "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="metrics"'})
            return
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception:
            logger.exception("metrics: a scrape failed")
            self._reply(500, b"the metrics could not be collected; see the server's log\n", "text/plain; charset=utf-8")
            return
        self._reply(200, body, content_type)

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        # The request line and status only (never a header, so never the token), at DEBUG: a
        # scrape every few seconds is not news.
        logger.debug("metrics: %s " + format, self.client_address[0], *args)


class Generation:
    """One admitted generation, from either front door: its id, its deltas, and the timings the
    metrics and the server's log want. Iterating it iterates the deltas and feeds the histograms."""

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


class _EngineCollector:
    """Reads the engine's snapshot at scrape time (a custom collector: the values are the engine's)."""

    def __init__(self, engine_view: EngineView) -> None:
        self._view = engine_view

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self._view()
        if view is None:
            return
        snap, adapters, max_loras = view
        names = ["", *adapters]  # every loaded adapter has a series, at 0 when idle
        for metric, help_, counts in (
            ("quadapt_requests_waiting", "Requests queued for their first step, by adapter.", snap.waiting_per_adapter),
            ("quadapt_requests_running", "Requests in the running batch, by adapter.", snap.running_per_adapter),
        ):
            family = GaugeMetricFamily(metric, help_, labels=["adapter"])
            for name in sorted(set(names) | set(counts)):
                family.add_metric([name], counts.get(name, 0))
            yield family
        for metric, help_, value in (
            ("quadapt_kv_cache_blocks_used", "Paged KV cache blocks in use.", snap.kv_blocks_used),
            ("quadapt_kv_cache_blocks_total", "Paged KV cache blocks in all.", snap.kv_blocks_total),
            ("quadapt_adapters_loaded", "Adapters loaded (on the host or in a slot).", len(adapters)),
            ("quadapt_decode_tokens_per_second", "Tokens sampled per second over the last seconds.",
             snap.decode_tokens_per_s),
        ):
            yield GaugeMetricFamily(metric, help_, value=value)
        yield _lora_requests_info(snap, max_loras)
        for metric, help_, value in (
            ("quadapt_requests_finished", "Requests that ran to a stop or their length.", snap.requests_finished),
            ("quadapt_requests_aborted", "Requests cancelled before their end (client gone, deadline).",
             snap.requests_aborted),
            ("quadapt_requests_failed", "Requests that ended with an error in the engine (their own, or their step's).",
             snap.requests_failed),
            ("quadapt_preemptions", "Running requests pushed back to the queue for want of cache blocks.",
             snap.preemptions),
            ("quadapt_prompt_tokens", "Prompt tokens prefilled.", snap.prompt_tokens),
            ("quadapt_generation_tokens", "Tokens sampled.", snap.generation_tokens),
            ("quadapt_adapter_slot_loads", "Adapters copied into a device slot.", snap.adapter_slot_loads),
            ("quadapt_adapter_evictions", "Adapters pushed out of a device slot for another.", snap.adapter_evictions),
        ):
            yield CounterMetricFamily(metric, help_, value=value)


def _lora_requests_info(snap: MetricsSnapshot, max_loras: int) -> Any:
    """The gauge the Kubernetes inference gateway's endpoint picker reads for LoRA affinity, as
    vLLM's `vllm:lora_requests_info`: one series whose labels say the adapter slots (`max_lora`)
    and which adapters have requests running and waiting (comma-separated names), and whose
    value is the time it was read (the picker takes the newest series)."""
    from prometheus_client.core import GaugeMetricFamily

    def active(counts: dict[str, int]) -> str:
        return ",".join(sorted(name for name, n in counts.items() if name and n > 0))

    family = GaugeMetricFamily(
        "quadapt_lora_requests_info",
        "Adapters with requests running and waiting, and the adapter slots, as labels; the value is the Unix time read.",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    family.add_metric([str(max_loras), active(snap.running_per_adapter), active(snap.waiting_per_adapter)], time.time())
    return family
