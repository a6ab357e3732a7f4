"""The gRPC server's Prometheus metrics: the engine's `MetricsSnapshot`, and per-request latencies.

What a scrape reads: gauges (requests waiting and running per adapter, KV blocks used and
total, adapters loaded, decode throughput) and counters (requests finished and aborted,
preemptions, prompt and generated tokens, adapter slot loads and evictions) come from the
engine's snapshot at scrape time; histograms of time to first token, inter-token latency and
request duration are fed by the server as each request streams, labelled by adapter ("" is the
base model), and a counter of RPCs by method and status code. Every metric lives in this object's own registry, not the process's
global one, so several servers (tests) can run in one process.

This file serves nothing but `/metrics` over plain HTTP on its own port: keep that port off
public networks. It holds no policy about requests; `server.py` decides what to record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from .metrics import MetricsSnapshot

logger = logging.getLogger(__name__)

# Seconds. TTFT on a CPU can reach seconds under load; inter-token latency is milliseconds on a
# GPU and tens of milliseconds on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# A snapshot of the engine and the names of the loaded adapters; None while the model loads.
EngineView = Callable[[], tuple[MetricsSnapshot, list[str]] | None]


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
        self.registry.register(_EngineCollector(engine_view))
        self._http: Any = None
        self.port: int | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Serve `/metrics` on `host:port` (0: any free port) from a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineCollector:
    """Reads the engine's snapshot at scrape time (a custom collector: the values are the engine's)."""

    def __init__(self, engine_view: EngineView) -> None:
        self._view = engine_view

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self._view()
        if view is None:
            return
        snap, adapters = view
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
        for metric, help_, value in (
            ("quadapt_requests_finished", "Requests that ran to a stop or their length.", snap.requests_finished),
            ("quadapt_requests_aborted", "Requests cancelled before their end (client gone, deadline).",
             snap.requests_aborted),
            ("quadapt_preemptions", "Running requests pushed back to the queue for want of cache blocks.",
             snap.preemptions),
            ("quadapt_prompt_tokens", "Prompt tokens prefilled.", snap.prompt_tokens),
            ("quadapt_generation_tokens", "Tokens sampled.", snap.generation_tokens),
            ("quadapt_adapter_slot_loads", "Adapters copied into a device slot.", snap.adapter_slot_loads),
            ("quadapt_adapter_evictions", "Adapters pushed out of a device slot for another.", snap.adapter_evictions),
        ):
            yield CounterMetricFamily(metric, help_, value=value)
