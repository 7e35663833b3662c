"""Prometheus metrics of the router process: the request path as the client sees it
(status, TTFT, inter-token latency, end-to-end latency, tokens), what the router
*predicted* when placing requests, the residency index, and the pools' health as the
router's probes see it.

What the engines *realized* (prefix-cache hits, prefill tokens computed, KV usage,
transfers) is exported by each worker on its own endpoint (workers/metrics.py); the
router lists every endpoint at ``/metrics/targets`` for Prometheus' HTTP service
discovery."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# kvrelay_requests_total{status}: every value is exported from the start (at 0).
STATUSES = ("ok", "bad_request", "unauthorized", "rate_limited", "unavailable", "timeout", "worker_died", "cancelled", "error")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
# kv_aware's parts span shares (KV usage, 0..1), MiB and tokens: one log-spaced scale.
COST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def status_of_http(code: int) -> str:
    """The ``status`` label of a request answered with an HTTP error before it ran."""
    if code == 401:
        return "unauthorized"
    if code == 429:
        return "rate_limited"
    if code == 503:
        return "unavailable"
    if 400 <= code < 500:
        return "bad_request"
    return "error"


@dataclass(frozen=True)
class WorkerView:
    """One worker as the router's pool probes see it."""

    role: str
    name: str
    up: bool
    restarts: int


@dataclass(frozen=True)
class IndexView:
    pool: str
    blocks: int
    evictions: int


@dataclass(frozen=True)
class ReliabilityView:
    """Admission and failure handling, as the cluster in this process counts them."""

    pool: str  # the pool requests queue for (decode, or colocated)
    queue_depth: int
    rejections: dict[str, int]  # reason (full | timeout) -> requests refused by admission
    migrations: int
    retries: int


ADMISSION_REJECTIONS = ("full", "timeout")
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class _StateCollector(Collector):
    """Read at scrape time: pool health, the residency indexes, admission and migrations."""

    def __init__(self, workers: Callable[[], list[WorkerView]], indexes: Callable[[], list[IndexView]],
                 reliability: Callable[[], ReliabilityView | None]) -> None:
        self.workers, self.indexes, self.reliability = workers, indexes, reliability

    def collect(self) -> Iterable:
        yield from self._reliability()
        workers, indexes = self.workers(), self.indexes()
        up = GaugeMetricFamily("kvrelay_worker_up", "1 if the router's health probe of the worker succeeds, else 0", labels=["role", "worker"])
        restarts = CounterMetricFamily("kvrelay_worker_restarts", "Worker restarts the router has seen", labels=["role", "worker"])
        for w in workers:
            up.add_metric([w.role, w.name], 1.0 if w.up else 0.0)
            restarts.add_metric([w.role, w.name], float(w.restarts))
        blocks = GaugeMetricFamily("kvrelay_router_index_blocks", "Blocks in the router's residency index", labels=["pool"])
        evictions = CounterMetricFamily("kvrelay_router_index_evictions", "Entries the residency index dropped to stay under its cap", labels=["pool"])
        for i in indexes:
            blocks.add_metric([i.pool], float(i.blocks))
            evictions.add_metric([i.pool], float(i.evictions))
        yield from (up, restarts, blocks, evictions)

    def _reliability(self) -> Iterable:
        r = self.reliability()
        depth = GaugeMetricFamily("kvrelay_admission_queue_depth", "Requests waiting for KV room in the pool's admission queue",
                                  labels=["pool"])
        rejected = CounterMetricFamily("kvrelay_admission_rejections", "Requests refused by admission (503): queue full "
                                       "or wait past its deadline", labels=["pool", "reason"])
        migrations = CounterMetricFamily("kvrelay_request_migrations", "Requests continued on another worker after their "
                                         "decode worker failed mid-stream")
        retries = CounterMetricFamily("kvrelay_request_retries", "Requests retried on another worker after a failure "
                                      "before their first token")
        if r is not None:
            depth.add_metric([r.pool], float(r.queue_depth))
            for reason in ADMISSION_REJECTIONS:
                rejected.add_metric([r.pool, reason], float(r.rejections.get(reason, 0)))
        migrations.add_metric([], float(r.migrations if r else 0))
        retries.add_metric([], float(r.retries if r else 0))
        yield from (depth, rejected, migrations, retries)


class RouterMetrics:
    def __init__(self, workers: Callable[[], list[WorkerView]], indexes: Callable[[], list[IndexView]],
                 reliability: Callable[[], ReliabilityView | None] = lambda: None) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the soak and overload runs read RSS here
        self.requests = Counter("kvrelay_requests", "Requests by final status", ["status"], registry=r)
        for s in STATUSES:
            self.requests.labels(s)
        self.ttft = Histogram("kvrelay_time_to_first_token_seconds", "Arrival at the router to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvrelay_inter_token_latency_seconds", "Time between two tokens of one choice",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvrelay_e2e_request_latency_seconds", "Arrival to the last token of a successful request",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvrelay_prompt_tokens", "Prompt tokens of requests that got their first token", registry=r)
        self.generation_tokens = Counter("kvrelay_generation_tokens", "Tokens generated and streamed to clients", registry=r)
        self.decisions = Counter("kvrelay_router_decisions", "Placement decisions per chosen worker", ["policy", "worker"], registry=r)
        self.predicted_hit_tokens = Counter(
            "kvrelay_router_predicted_hit_tokens", "Prompt tokens the router expected the chosen worker to hold", registry=r
        )
        self.placement_cost = Histogram(
            "kvrelay_router_placement_cost", "The chosen placement's cost, part by part (kv_aware: tokens of prefill "
            "work, queued tokens, running sequences, KV usage after, MiB to ship; see router/placement.py)",
            ["policy", "part"], buckets=COST_BUCKETS, registry=r)
        self.shadow_agreement = Histogram(
            "kvrelay_kv_shadow_agreement", "Shadow sampling: fraction of the first greedy tokens of a lossy handoff "
            "identical to decoding on full KV", ["preset"], buckets=(0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r)
        self.admission_wait = Histogram("kvrelay_admission_wait_seconds", "Time a request waited in the admission queue "
                                        "for KV room or for a restarting worker (requests that queued), by the pool waited on", ["pool"], buckets=WAIT_BUCKETS, registry=r)
        r.register(_StateCollector(workers, indexes, reliability))
