"""What the engine counts and measures, for a server to export (Prometheus, logs): no exporter here.

`EngineStats` holds running counters (requests, tokens, preemptions, adapter slot loads and
evictions) and the latest latency samples (time to first token, inter-token latency), which
the engine updates as it steps; `EngineStats.snapshot` adds the gauges read off the engine at
that moment (queue depth, running and waiting per adapter, KV blocks used) and decode
throughput over a recent window. A `MetricsSnapshot` is plain data.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

# Latency samples kept for percentiles; an exporter that wants every sample drains them itself.
_SAMPLES = 4096


@dataclass(frozen=True)
class MetricsSnapshot:
    """The engine's state and counters at one moment.

    Attributes:
        waiting, running: requests in each queue (waiting is the queue depth).
        waiting_per_adapter, running_per_adapter: the same by adapter name ("" = base model).
        kv_blocks_used, kv_blocks_total: the paged cache's blocks.
        requests_finished, requests_aborted, preemptions: counters since start.
        requests_failed: requests that ended with an error in the engine, since start.
        prompt_tokens, generation_tokens: tokens prefilled and sampled since start.
        adapter_slot_loads, adapter_evictions: adapters copied into slots, and pushed out of them.
        time_to_first_token_s, inter_token_latency_s: recent samples, oldest first.
        decode_tokens_per_s: tokens sampled per second over the last `window_s` seconds.
    """

    waiting: int
    running: int
    waiting_per_adapter: dict[str, int]
    running_per_adapter: dict[str, int]
    kv_blocks_used: int
    kv_blocks_total: int
    requests_finished: int
    requests_aborted: int
    preemptions: int
    prompt_tokens: int
    generation_tokens: int
    adapter_slot_loads: int
    adapter_evictions: int
    time_to_first_token_s: list[float]
    inter_token_latency_s: list[float]
    decode_tokens_per_s: float
    requests_failed: int = 0


@dataclass
class EngineStats:
    """Counters and latency samples the engine updates; see the module docstring."""

    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    window_s: float = 10.0
    _token_times: deque[tuple[float, int]] = field(default_factory=deque)

    def record_tokens(self, n: int, now: float | None = None) -> None:
        """`n` tokens were sampled in one step, at `now`."""
        now = time.perf_counter() if now is None else now
        self.generation_tokens += n
        self._token_times.append((now, n))
        while self._token_times and now - self._token_times[0][0] > self.window_s:
            self._token_times.popleft()

    def decode_rate(self) -> float:
        """Tokens sampled per second over the window (0 with fewer than two steps in it)."""
        if len(self._token_times) < 2:
            return 0.0
        span = self._token_times[-1][0] - self._token_times[0][0]
        return sum(n for _, n in list(self._token_times)[1:]) / span if span > 0 else 0.0
