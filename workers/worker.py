"""What every worker actor has: one engine on its own thread, a KV transport, health,
counters, and KV events. Role-specific work lives in prefill_worker / decode_worker.

Workers are plain classes with async methods; the pool turns them into Ray actors
(``ray.remote(cls)``), and tests may also run them in-process."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import torch

from cluster.compression import CompressionSection
from cluster.kv_events import KVEvent, KVSnapshot
from cluster.kv_layout import KVLayout
from cluster.worker_api import WorkerHealth, WorkerSpec  # noqa: F401 - WorkerSpec re-exported
from workers.async_engine import AsyncEngine
from workers.config import EngineConfig
from cluster.worker_api import RequestOutput
from cluster import heap_trim
from workers.engine import Engine
from workers.metrics import WorkerMetrics
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class WorkerBase:
    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=os.environ.get("KVRELAY_LOG_LEVEL", "WARNING").upper())
        self.spec = spec
        self.started_at = time.time()
        if spec.engine.num_threads:
            torch.set_num_threads(spec.engine.num_threads)
        self.engine = Engine(spec.engine)
        self.aengine = AsyncEngine(self.engine)
        kv = self.engine.kv_cache.spec
        self.layout = KVLayout(
            model_id=self.engine.model_config.name,
            dtype=str(kv.dtype).removeprefix("torch."),
            num_layers=kv.num_layers,
            num_kv_heads=kv.num_kv_heads,
            head_dim=kv.head_dim,
            block_size=kv.block_size,
        )
        self.transport = None
        if spec.transport != "none":
            from cluster.transport import make_transport

            self.transport = make_transport(spec.transport)
            if spec.transport_faults:
                from cluster.transport.faults import FaultyTransport

                mode = spec.transport_faults.get("mode", "fail")
                self.transport = FaultyTransport(
                    self.transport,
                    drop=mode == "drop",
                    delay_s=float(spec.transport_faults.get("delay_s", 0.0)) if mode == "delay" else 0.0,
                )
        self.transfer_failures: Counter[str] = Counter()
        self.transfer_bytes = 0
        self.transfer_full_bytes = 0
        # preset label -> [wire bytes, full bytes (cache dtype), full bytes (16-bit)], sender side
        self.transfer_by_preset: dict[str, list[int]] = {}
        self.compression_fallbacks: Counter[str] = Counter()  # this worker's; the engine counts its own
        self.metrics = WorkerMetrics(self)
        self.engine.scheduler.on_first_scheduled = self.metrics.queue_time.observe
        self.metrics_address = self._serve_metrics()
        heap_trim.start(spec.heap_trim_s)  # RSS tracks live memory, not glibc's free lists

    def count_transfer(self, preset: str, sent: int, full: int, full_16bit: int) -> None:
        self.transfer_bytes += sent
        self.transfer_full_bytes += full
        row = self.transfer_by_preset.setdefault(preset, [0, 0, 0])
        row[0] += sent
        row[1] += full
        row[2] += full_16bit

    def fallbacks(self) -> dict[str, int]:
        """Compressed handoffs that lost (part of) their compression, by reason."""
        out = Counter(self.compression_fallbacks)
        out.update(self.engine.stats.compression_fallbacks)
        return dict(out)

    def _serve_metrics(self) -> str | None:
        spec = self.spec
        if spec.metrics_port is None:
            return None
        try:
            port = self.metrics.serve(spec.metrics_host, spec.metrics_port)
        except OSError as e:  # the fixed port is taken (two workers on one host): any free one
            log.warning("metrics port %d unavailable (%s); using a free port", spec.metrics_port, e)
            port = self.metrics.serve(spec.metrics_host, 0)
        host = spec.metrics_host
        if host in ("0.0.0.0", "::", ""):
            host = _node_ip()
        return f"{host}:{port}"

    # ---- probes -----------------------------------------------------------------------

    async def health(self) -> WorkerHealth:
        bm = self.engine.block_manager
        sched = self.engine.scheduler
        return WorkerHealth(
            self.spec.role, self.spec.index, os.getpid(), self.started_at, self.aengine.is_alive,
            len(sched.running), len(sched.waiting), bm.usage, bm.num_free_blocks, bm.num_blocks,
            self.engine.max_model_len, self.metrics_address,
        )

    async def get_layout(self) -> KVLayout:
        return self.layout

    async def transport_address(self) -> bytes | None:
        return None if self.transport is None else self.transport.address

    async def stats(self) -> dict:
        out = asdict(self.engine.stats)
        out.update(
            role=self.spec.role, index=self.spec.index,
            transfer_failures=dict(self.transfer_failures),
            transfer_bytes=self.transfer_bytes, transfer_full_bytes=self.transfer_full_bytes,
            transfer_by_preset={k: list(v) for k, v in self.transfer_by_preset.items()},
            compression_fallbacks=self.fallbacks(),
            prefix_cache_hash_mismatches=self.engine.block_manager.hash_mismatches,
        )
        return out

    async def kv_events(self) -> list[KVEvent]:
        """Drain this worker's KV events (in order, each exactly once)."""
        return await self.aengine.run_on_engine(self.engine.block_manager.take_events)

    async def kv_snapshot(self) -> KVSnapshot:
        return await self.aengine.run_on_engine(self.engine.block_manager.snapshot)

    # ---- requests ---------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, compression: str | None = None,
        rng_state: bytes | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The whole request on this worker, its KV never compressed (``compression``
        is for the colocated worker, which can run the codecs in process).
        ``rng_state`` continues a migrated request's sampling RNG."""
        def admit():
            self.engine.add_request(request_id, prompt, params, rng_state)

        async for out in self.aengine.generate(request_id, prompt, params, timeout_s=None, start=admit):
            yield out

    async def abort(self, request_id: str) -> bool:
        return await self.aengine.abort(request_id)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Stop taking work: wait (bounded) for running requests, then stop the engine."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = await self.aengine.run_on_engine(lambda: self.engine.has_unfinished or bool(self.engine.scheduler.waiting_remote))
            if not busy:
                break
            await asyncio.sleep(0.05)
        idle = not self.engine.has_unfinished
        self.aengine.shutdown()
        if self.transport is not None:
            self.transport.close()
        self.metrics.close()
        return idle

    async def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """How many leading blocks of this chain the engine really holds (ground truth
        for the router's residency index)."""
        return await self.aengine.run_on_engine(lambda: self.engine.block_manager.match_prefix(block_hashes).num_blocks)


def _node_ip() -> str:
    """This node's address as the rest of the Ray cluster sees it (127.0.0.1 outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - fall back to loopback
        pass
    return "127.0.0.1"
