"""`GET /metrics`: the engine's numbers in Prometheus' text format, read when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .generation_queue import JobBoard


class EngineCollector:
    """Reads the queue's totals and the runtime snapshot the engine thread left after its last request,
    so a scrape never touches the model while it runs."""

    def __init__(self, engine: JobBoard):
        self.engine = engine

    def collect(self):
        e = self.engine
        snap = e.snapshot
        yield GaugeMetricFamily("moe_chat_queue_depth", "Requests waiting or running", value=e.depth)
        yield GaugeMetricFamily("moe_chat_decode_tokens_per_second", "Decode speed of the last request",
                                value=e.last_stats.get("decode_tokens_per_s", 0.0))
        yield GaugeMetricFamily("moe_chat_prefill_tokens_per_second", "Prefill speed of the last request",
                                value=e.last_stats.get("prefill_tokens_per_s", 0.0))
        for name, help_text in (("prompt_tokens", "Prompt tokens of finished requests"),
                                ("completion_tokens", "Generated tokens of finished requests"),
                                ("cancelled", "Requests cancelled by their client")):
            yield CounterMetricFamily(f"moe_chat_{name}", help_text, value=e.totals[name])
        yield GaugeMetricFamily("moe_chat_cache_bytes", "Bytes of the expert cache",
                                value=snap.get("cache_bytes", 0))
        yield GaugeMetricFamily("moe_chat_cache_budget_bytes", "The expert cache's budget",
                                value=snap.get("budget_bytes", 0))
        yield GaugeMetricFamily("moe_chat_hit_rate", "Share of expert uses served from the cache",
                                value=snap.get("hit_rate", 0.0))
        layers = GaugeMetricFamily("moe_chat_layer_hit_rate", "Cache hit rate per MoE layer", labels=["layer"])
        for row in snap.get("per_layer", []):
            uses = row.get("hits", 0) + row.get("misses", 0) + row.get("fetches", 0)
            layers.add_metric([str(row["layer"])], row.get("hits", 0) / uses if uses else 0.0)
        yield layers


class ServerMetrics:
    """A registry of its own, so two servers in one process (tests) do not collide."""

    def __init__(self, engine: JobBoard):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.responses = Counter("moe_chat_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
