"""Prometheus metrics of the request path (router side) and the engines' realized
counters, exported from the router's /metrics.

The router polls every worker's counters (it polls their health anyway) and exports
them with ``role`` and ``worker`` labels, so one scrape of the router sees the whole
cluster: what the router *predicted* (decisions, predicted hit tokens) next to what the
engines *realized* (prefix-cache hits, prefill tokens computed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# engine stats field -> (metric name without _total, help)
WORKER_COUNTERS = {
    "prefill_computed_tokens": ("kvrelay_prefill_computed_tokens", "Prompt tokens run through the model (not served from cache)"),
    "prefix_cache_hit_tokens": ("kvrelay_prefix_cache_hit_tokens", "Prompt tokens served from the worker's prefix cache"),
    "prefix_cache_query_tokens": ("kvrelay_prefix_cache_query_tokens", "Prompt tokens looked up in the worker's prefix cache"),
    "preemptions": ("kvrelay_preemptions", "Requests preempted for lack of KV memory (recomputed later)"),
    "kv_recomputes": ("kvrelay_kv_recomputes", "Handed-off requests whose KV never arrived, recomputed on the decode worker"),
}


class WorkerStatsCollector(Collector):
    """Exports the latest polled worker stats: ``source()`` -> list of stats dicts."""

    def __init__(self, source: Callable[[], list[dict]]) -> None:
        self.source = source

    def collect(self) -> Iterable:
        stats = [s for s in self.source() if "error" not in s]
        for field, (name, doc) in WORKER_COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=["role", "worker"])
            for s in stats:
                fam.add_metric([s["role"], f"{s['role']}-{s['index']}"], float(s.get(field, 0)))
            yield fam


class RouterMetrics:
    def __init__(self, stats_source: Callable[[], list[dict]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("kvrelay_router_decisions", "Placement decisions per chosen worker", ["policy", "worker"], registry=r)
        self.predicted_hit_tokens = Counter(
            "kvrelay_router_predicted_hit_tokens", "Prompt tokens the router expected the chosen worker to hold", registry=r
        )
        self.index_blocks = Gauge("kvrelay_router_index_blocks", "Blocks in the router's residency index", ["pool"], registry=r)
        self.index_evictions = Gauge("kvrelay_router_index_evictions", "Entries the residency index dropped to stay under its cap", ["pool"], registry=r)
        self.requests = Counter("kvrelay_requests", "Requests by final status", ["status"], registry=r)
        r.register(WorkerStatsCollector(stats_source))
