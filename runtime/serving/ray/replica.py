"""The engine as a Ray Serve deployment: one `AsyncLLM` per replica, adapters as multiplexed models.

Each replica builds its engine through `build_engine` (`ServerConfig.engine_args`, as the single
server does) and takes requests one by one: its own engine thread batches them, adapters mixed,
which `@serve.batch` would not (it splits batches by model id). An adapter is a Serve multiplexed
model: the first request naming it on a replica loads it from the `AdapterResolver` into the
engine's registry, Serve announces the replica as holding it so later requests for it route here,
and at most `max_num_models_per_replica` = the engine's adapter slots stay loaded (Serve evicts the
least recently used). The registry refuses to unload an adapter that unfinished requests use, so
an eviction of a busy adapter is deferred until its last request here ends (counted in
`quadapt_adapter_unloads{outcome="deferred"}`), never forced under a running request.

`generate` streams one request: first a `Placement` (this replica, and whether the adapter was
already loaded here), then the request's `TextDelta`s. Metrics go through `ray.serve.metrics`
(Serve adds the deployment and replica tags): adapter hits and loads, unloads, queue depth and
KV cache use; with `metrics_port`, each replica also serves the single server's `/metrics` (the
engine's queues per adapter, cache, counters) on `metrics_port` + its rank on its node. This file
holds no other network code; `front.py` is the ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...engine.registry import AdapterInUseError
from ...errors import EngineDeadError, quote
from ...text.prompt import Prompt
from ...text.sampling_params import SamplingParams
from ..config import ServerConfig, load_llm
from .resolver import AdapterResolver

logger = logging.getLogger(__name__)

# Seconds between two reads of the engine's queues and cache into the replica's gauges.
GAUGE_PERIOD_S = 2.0


@dataclass(frozen=True)
class Placement:
    """Where a request runs: the replica's id, and whether its adapter was loaded there before it
    came (None for the base model)."""

    replica: str
    adapter_hit: bool | None


class EngineReplica:
    """One replica's engine and adapters; `engine_deployment` makes the Serve deployment of it.

    Args:
        config: what to serve (the model, the engine's limits, start-up adapters and adapter dirs).
    """

    def __init__(self, config: ServerConfig) -> None:
        from ray import serve
        from ray.serve import metrics

        self.config = config
        self.resolver = AdapterResolver(config.adapters, config.adapter_dirs)
        self.llm = load_llm(config)
        self.llm.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held = set(config.adapters)  # loaded in the registry by name, as this replica knows it
        self._users: Counter[str] = Counter()  # unfinished requests here, by adapter
        self._retiring: dict[str, int] = {}  # evicted by Serve while in use (-> which load): unloaded after them
        self._loads: Counter[str] = Counter()  # how many times Serve had each adapter loaded here
        self._changing = asyncio.Lock()
        self._counters = _Counters(metrics)
        self._gauges = {name: metrics.Gauge(name, help_) for name, help_ in (
            ("quadapt_replica_requests_waiting", "Requests queued for their first step on this replica."),
            ("quadapt_replica_requests_running", "Requests in this replica's running batch."),
            ("quadapt_replica_kv_cache_blocks_used", "Paged KV cache blocks in use on this replica."),
            ("quadapt_replica_kv_cache_blocks_total", "Paged KV cache blocks of this replica."),
            ("quadapt_replica_adapters_loaded", "Adapters loaded on this replica."),
        )}
        self._gauge_task: asyncio.Task | None = None
        self.metrics_port = None
        if config.metrics_port is not None:  # the single server's /metrics, one port per replica on a node
            from ..metrics import ServerMetrics

            rank = getattr(getattr(serve.get_replica_context(), "rank", None), "local_rank", 0) or 0
            self._server_metrics = ServerMetrics(lambda: (self.llm.metrics(), sorted(self._held), self.slots))
            port = config.metrics_port + rank if config.metrics_port else 0
            self.metrics_port = self._server_metrics.serve_http(config.metrics_host.strip("[]"), port,
                                                                config.metrics_tokens)
            logger.info("replica %s: /metrics on %s:%d", self.replica, config.metrics_host, self.metrics_port)
            self._counters.mirror(self._server_metrics.registry)
        logger.info("replica %s serving %s (%d adapter slots)", self.replica, config.model, self.slots)

    @property
    def slots(self) -> int:
        return self.llm.engine.config.max_loras

    def describe(self) -> dict[str, Any]:
        """The model's and the engine's configuration, for the front door's ServerInfo and Tokenize."""
        return {"model_config": self.llm.engine.executor.config, "engine_config": self.llm.engine.config}

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread stopped is restarted."""
        if self.llm.failed is not None:
            raise EngineDeadError(f"the engine stopped after an error ({self.llm.failed!r})")

    async def generate(self, prompt: Prompt, params: SamplingParams, adapter: str | None,
                       request_id: str) -> AsyncIterator[Placement | Any]:
        """One request: its `Placement`, then its `TextDelta`s. Cancelled (the client gone), it is
        aborted and its cache blocks freed before the engine's next step."""
        self._start_gauges()
        hit = None
        if adapter:
            self._users[adapter] += 1  # before the load: an eviction from here on waits for this request
        try:
            if adapter:
                hit = adapter in self._held and adapter not in self._retiring
                self._counters.inc("quadapt_adapter_requests", adapter=adapter, result="hit" if hit else "load")
                await self.adapter(adapter)  # Serve's multiplexed loader (`engine_deployment`)
            yield Placement(self.replica, hit)
            async with contextlib.aclosing(self.llm.stream(prompt, params, adapter=adapter,
                                                           request_id=request_id)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            if adapter:
                self._users[adapter] -= 1
                if not self._users[adapter]:
                    del self._users[adapter]
                    if adapter in self._retiring:
                        await self._unload(adapter, self._retiring[adapter])

    async def adapter(self, name: str) -> Any:  # replaced by the multiplexed loader in `engine_deployment`
        raise NotImplementedError

    async def load_adapter(self, name: str) -> _Held:
        """Load `name` from the resolver into the registry (Serve calls it once per replica until evicted)."""
        self._loop = asyncio.get_running_loop()
        async with self._changing:
            self._loads[name] += 1  # an eviction of an earlier load no longer applies
            self._retiring.pop(name, None)  # evicted while busy, wanted again: it never left the registry
            if name not in self._held:
                path = self.resolver.resolve(name)
                version = await asyncio.to_thread(self.llm.load_adapter, name, path)
                logger.info("adapter %s loaded from %s (%s)", quote(name), path, version.identity)
                self._held.add(name)
            return _Held(self, name, self._loads[name])

    def evicted(self, name: str, load: int) -> None:
        """Serve evicted the `load`-th load of `name` (from any thread): unload it now, or after its
        last request here; not if it was loaded again since."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._unload(name, load)))

    async def _unload(self, name: str, load: int) -> None:
        async with self._changing:  # one load or unload at a time, each seeing the other's result
            if self._loads[name] != load or name not in self._held:
                return
            if self._users.get(name):
                if name not in self._retiring:
                    self._counters.inc("quadapt_adapter_unloads", outcome="deferred")
                    logger.info("adapter %s evicted while %d request(s) use it: unloaded after them", quote(name),
                                self._users[name])
                self._retiring[name] = load
                return
            try:
                await asyncio.wrap_future(self.llm.unload_adapter(name, wait=False))
            except AdapterInUseError:  # an abort not yet run: the next request's end retries it
                self._retiring[name] = load
                return
            self._retiring.pop(name, None)
            self._held.discard(name)
        self._counters.inc("quadapt_adapter_unloads", outcome="unloaded")
        logger.info("adapter %s unloaded", quote(name))

    def _start_gauges(self) -> None:
        if self._gauge_task is None:
            self._loop = asyncio.get_running_loop()
            self._gauge_task = asyncio.ensure_future(self._read_gauges())

    async def _read_gauges(self) -> None:
        while self.llm.failed is None:  # a failed engine fails Serve's health check instead
            snap = await asyncio.to_thread(self.llm.metrics)  # read between two steps
            for key, value in (("requests_waiting", snap.waiting), ("requests_running", snap.running),
                               ("kv_cache_blocks_used", snap.kv_blocks_used),
                               ("kv_cache_blocks_total", snap.kv_blocks_total), ("adapters_loaded", len(self._held))):
                self._gauges[f"quadapt_replica_{key}"].set(value)
            await asyncio.sleep(GAUGE_PERIOD_S)

    def __del__(self) -> None:  # Serve's graceful shutdown
        if getattr(self, "metrics_port", None) is not None:
            self._server_metrics.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


class _Counters:
    """The replica's adapter counters in Serve's metrics, and mirrored into the replica's own
    `/metrics` registry when it serves one."""

    HELP = {
        "quadapt_adapter_requests": ("Adapter requests on this replica, by whether it held the adapter already "
                                     "(hit) or loaded it (load).", ("adapter", "result")),
        "quadapt_adapter_unloads": ("Adapters Serve evicted here, unloaded at once or deferred past their last "
                                    "request.", ("outcome",)),
    }

    def __init__(self, metrics: Any) -> None:
        self._ray = {name: metrics.Counter(name, help_, tag_keys=tags) for name, (help_, tags) in self.HELP.items()}
        self._mirror: dict[str, Any] = {}

    def mirror(self, registry: Any) -> None:
        from prometheus_client import Counter as PrometheusCounter

        self._mirror = {name: PrometheusCounter(name, help_, tags, registry=registry)
                        for name, (help_, tags) in self.HELP.items()}

    def inc(self, name: str, **tags: str) -> None:
        self._ray[name].inc(tags=tags)
        if name in self._mirror:
            self._mirror[name].labels(**tags).inc()


class _Held:
    """What the multiplexed loader returns for an adapter; Serve calls `__del__` when it evicts it."""

    def __init__(self, replica: EngineReplica, name: str, load: int) -> None:
        self.replica, self.name, self.load, self.done = replica, name, load, False

    def __del__(self) -> None:
        if not self.done:  # Serve's eviction, then the garbage collector: once
            self.done = True
            self.replica.evicted(self.name, self.load)


def engine_deployment(config: ServerConfig) -> type:
    """The replica class with its multiplexed loader, `max_num_models_per_replica` = the engine's
    adapter slots (at least 1: an engine without slots refuses every adapter by name)."""
    from ray import serve

    slots = max(1, config.engine_args().lora_slots())

    class QuadaptEngine(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=slots)
        async def adapter(self, name: str) -> _Held:
            return await self.load_adapter(name)

    return QuadaptEngine
