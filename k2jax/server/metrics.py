"""Prometheus metrics of the server and its engine, served as text at `GET /metrics`.

Per request (observed by the routes): time to first token, mean time per output token after the
first, finished requests by endpoint and finish reason, cancelled requests, prompt and generated
token counts. Engine state (read from `engine.stats()` at each scrape, so it is never stale):
queue length, running requests, KV pages used / cached / total, and the prefix cache's hit rate
(prompt tokens served from cached pages over prompt tokens looked up, since start).

Each app gets its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector(Collector):
    """Engine gauges, read from `stats()` when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = {
            "k2jax_queue_length": ("requests waiting for a batch slot", s.queue_length),
            "k2jax_running_requests": ("requests in the running batch", s.running),
            "k2jax_kv_pages_total": ("pages in the KV pool", s.num_pages),
            "k2jax_kv_pages_used": ("KV pages held by running requests", s.pages_used),
            "k2jax_kv_pages_cached": ("free KV pages kept for the prefix cache", s.pages_cached),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value)
        lookups, hits = s.prefix_lookup_tokens, s.prefix_hit_tokens
        yield GaugeMetricFamily(
            "k2jax_prefix_cache_hit_rate",
            "prompt tokens served from the prefix cache / prompt tokens looked up, since start",
            value=hits / lookups if lookups else 0.0,
        )
        for name, documentation, value in (
            ("k2jax_prefix_cache_hit_tokens", "prompt tokens served from the cache", hits),
            ("k2jax_prefix_cache_lookup_tokens", "prompt tokens looked up in the cache", lookups),
            ("k2jax_prefill_tokens_computed", "prompt tokens prefilled", s.prefill_tokens_computed),
        ):
            yield CounterMetricFamily(name, documentation, value=value)


class Metrics:
    """The server's registry: request histograms and counters plus the engine's gauges."""

    def __init__(self, engine_stats: Callable[[], object]):
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "k2jax_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "k2jax_time_per_output_token_seconds",
            "a request's mean time between generated tokens after the first",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "k2jax_requests",
            "finished requests by endpoint and finish reason",
            ["endpoint", "finish_reason"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "k2jax_requests_cancelled",
            "requests cancelled before they finished (client gone, stop string)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "k2jax_requests_rejected",
            "requests refused, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "k2jax_prompt_tokens", "prompt tokens of admitted requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "k2jax_generation_tokens", "tokens generated", registry=self.registry
        )
        self.registry.register(_EngineCollector(engine_stats))

    def observe_request(self, arrived: float, token_times: list[float]) -> None:
        """TTFT and the mean time per output token of one request (monotonic seconds)."""
        if token_times:
            self.time_to_first_token.observe(token_times[0] - arrived)
        if len(token_times) > 1:
            spread = token_times[-1] - token_times[0]
            self.time_per_output_token.observe(spread / (len(token_times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
