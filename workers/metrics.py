"""A worker's own Prometheus endpoint: what its engine realized (prefix-cache hits,
prefill tokens computed, KV usage, batch sizes, preemptions) and its side of the KV
transfers, every series labelled ``role`` and ``worker``.

Each worker process serves this registry on its own port (``metrics.worker_port``; 0
picks a free one). The router lists every worker's address at ``/metrics/targets`` so
one Prometheus scrape config reaches them all, on every node. Counters are read from
the engine at scrape time (no second copy to keep in sync); the two latencies are
histograms observed as they happen."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from workers.worker import WorkerBase

log = logging.getLogger(__name__)

# TransferError reasons (cluster/transport/base.py), exported at 0 before any failure.
TRANSFER_FAILURE_REASONS = ("timeout", "peer", "closed", "size", "injected")
QUEUE_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Why a compressed handoff lost (part of) its compression: the guard raised a layer's
# budget (prefill side); no room for that on the decode worker, a preemption, or a
# malformed payload (decode side; the request is recomputed at full size).
FALLBACK_REASONS = ("guard", "capacity", "preempted", "codec")
KEPT_FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# EngineStats field -> (counter name without _total, help)
ENGINE_COUNTERS = {
    "prefix_cache_query_tokens": ("kvrelay_prefix_cache_query_tokens", "Prompt tokens looked up in this worker's prefix cache"),
    "prefix_cache_hit_tokens": ("kvrelay_prefix_cache_hit_tokens", "Prompt tokens served from this worker's prefix cache"),
    "prefill_computed_tokens": ("kvrelay_prefill_computed_tokens", "Prompt tokens run through the model (not served from cache)"),
    "preemptions": ("kvrelay_preemptions", "Requests preempted for lack of KV memory (recomputed later)"),
    "kv_recomputes": ("kvrelay_kv_recomputes", "Handed-off requests whose KV never arrived, recomputed on this worker"),
}


class _WorkerCollector(Collector):
    def __init__(self, worker: "WorkerBase", labels: list[str]) -> None:
        self.worker = worker
        self.labels = labels

    def collect(self) -> Iterable:
        w, values = self.worker, self.labels
        stats = w.engine.stats
        for field, (name, doc) in ENGINE_COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=["role", "worker"])
            fam.add_metric(values, float(getattr(stats, field)))
            yield fam
        sched, bm = w.engine.scheduler, w.engine.block_manager
        fam = CounterMetricFamily("kvrelay_prefix_cache_hash_mismatches",
                                  "Prefix-cache hash hits refused because the block held other tokens (collisions)",
                                  labels=["role", "worker"])
        fam.add_metric(values, float(bm.hash_mismatches))
        yield fam
        for name, doc, value in (
            ("kvrelay_kv_cache_usage_ratio", "Fraction of this worker's KV blocks in use (0..1)", bm.usage),
            ("kvrelay_running_requests", "Requests in this worker's running batch", len(sched.running)),
            ("kvrelay_waiting_requests", "Requests waiting in this worker's queue", len(sched.waiting)),
        ):
            fam = GaugeMetricFamily(name, doc, labels=["role", "worker"])
            fam.add_metric(values, float(value))
            yield fam
        # Bytes are counted by the sender (prefill workers), per compression preset; a
        # decode worker sends none (its series stay at 0 under preset "none").
        rows = dict(w.transfer_by_preset) if w.spec.role != "decode" else {}
        rows.setdefault("none", [0, 0, 0])
        for col, (name, doc) in enumerate((
            ("kvrelay_kv_transfer_bytes", "KV payload bytes this worker put on the wire"),
            ("kvrelay_kv_transfer_full_bytes", "What shipping the whole prompt's KV uncompressed (cache dtype) would have cost"),
            ("kvrelay_kv_transfer_full_16bit_bytes", "The same prompts' KV in 16 bits, what compression ratios are quoted against"),
        )):
            fam = CounterMetricFamily(name, doc, labels=["role", "worker", "preset"])
            for preset in sorted(rows):
                fam.add_metric([*values, preset], float(rows[preset][col]))
            yield fam
        fam = CounterMetricFamily("kvrelay_kv_compression_fallbacks", "Compressed handoffs that lost (part of) their "
                                  "compression, by reason", labels=["role", "worker", "reason"])
        fallbacks = w.fallbacks()
        for reason in sorted(set(FALLBACK_REASONS) | set(fallbacks)):
            fam.add_metric([*values, reason], float(fallbacks.get(reason, 0)))
        yield fam
        fam = CounterMetricFamily("kvrelay_kv_transfer_failures", "KV transfers this worker saw fail, by reason",
                                  labels=["role", "worker", "reason"])
        failures = dict(w.transfer_failures)
        for reason in sorted(set(TRANSFER_FAILURE_REASONS) | set(failures)):
            fam.add_metric([*values, reason], float(failures.get(reason, 0)))
        yield fam


class _LabelledHistogram:
    """A histogram with this worker's role/worker labels bound; ``labels(preset)`` adds the rest."""

    def __init__(self, hist: Histogram, role: str, name: str) -> None:
        self.hist, self.role, self.name = hist, role, name

    def labels(self, *rest: str):
        return self.hist.labels(self.role, self.name, *rest)


class WorkerMetrics:
    def __init__(self, worker: "WorkerBase") -> None:
        role, name = worker.spec.role, f"{worker.spec.role}-{worker.spec.index}"
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc. (RSS growth in the soak run)
        self.queue_time = Histogram(
            "kvrelay_request_queue_time_seconds", "Time a request waited in this worker's queue before it was first scheduled",
            ["role", "worker"], buckets=QUEUE_TIME_BUCKETS, registry=self.registry,
        ).labels(role, name)
        self.transfer_seconds = Histogram(
            "kvrelay_kv_transfer_seconds", "KV transfer time, first page sent to the decode worker's ack (successful transfers)",
            ["role", "worker"], buckets=TRANSFER_BUCKETS, registry=self.registry,
        ).labels(role, name)
        self.kept_fraction = _LabelledHistogram(Histogram(
            "kvrelay_kv_compression_kept_ratio", "Per request, the fraction of the shipped suffix's tokens a sparse payload kept "
            "(mean over layers)", ["role", "worker", "preset"], buckets=KEPT_FRACTION_BUCKETS, registry=self.registry,
        ), role, name)
        if role != "decode":  # every sparse preset's series exists from the start
            from cluster.compression import PRESETS

            for preset, settings in PRESETS.items():
                if settings.sparse:
                    self.kept_fraction.labels(preset)
        self.registry.register(_WorkerCollector(worker, [role, name]))
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the port (a free one when ``port`` is 0)."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
