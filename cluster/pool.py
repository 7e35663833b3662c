"""A pool of worker actors of one role: building them on Ray with resources that fit
the hardware, health probes, restarts, and graceful drain.

Ray restarts a dead actor (``max_restarts``) with the same handle; the pool notices
through its probes (the worker's ``started_at`` changes) and counts the restart. The
pool's view of who is up is what placement uses."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cluster.kv_layout import KVLayout
from cluster.worker_actor import WorkerActor, worker_class
from cluster.worker_api import WorkerAPI, WorkerHealth, WorkerSpec
from cluster.worker_handle import WorkerDiedError, WorkerHandle

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    handle: WorkerHandle
    up: bool = False
    health: WorkerHealth | None = None
    restarts: int = 0
    last_seen: float = 0.0
    layout: KVLayout | None = None


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float
    max_restarts: int
    custom: tuple[tuple[str, float], ...] = ()  # Ray custom resources, e.g. (("kvrelay_prefill", 1.0),)


class WorkerPool:
    def __init__(self, role: str, specs: list[WorkerSpec], resources: Resources, use_ray: bool) -> None:
        self.role = role
        self.specs = specs
        self.resources = resources
        self.use_ray = use_ray
        self.workers: list[WorkerState] = []
        self._probe_task: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self, startup_timeout_s: float) -> None:
        for spec in self.specs:
            if self.use_ray:
                import ray

                # The actor class is torch-free; the role's worker is built inside the actor.
                actor_cls = ray.remote(WorkerActor).options(
                    num_cpus=self.resources.num_cpus,
                    num_gpus=self.resources.num_gpus,
                    max_restarts=self.resources.max_restarts,
                    resources=dict(self.resources.custom) or None,
                    max_task_retries=0,  # a request is retried by the cluster, never replayed blindly
                    max_concurrency=1000,
                )
                target = actor_cls.remote(spec)
            else:
                target = worker_class(self.role)(spec)
            self.workers.append(WorkerState(WorkerHandle(self.role, spec.index, target, self.use_ray)))
        deadline = time.monotonic() + startup_timeout_s
        for w in self.workers:
            w.layout = await w.handle.call(WorkerAPI.get_layout, timeout_s=max(deadline - time.monotonic(), 1.0))
            await self._probe(w, timeout_s=max(deadline - time.monotonic(), 1.0))
        log.info("%s pool up: %d workers", self.role, len(self.workers))

    def start_probing(self, interval_s: float, timeout_s: float) -> None:
        async def loop():
            while True:
                await asyncio.gather(*(self._probe(w, timeout_s) for w in self.workers))
                await asyncio.sleep(interval_s)

        self._probe_task = asyncio.get_running_loop().create_task(loop())

    async def _probe(self, w: WorkerState, timeout_s: float) -> None:
        try:
            h: WorkerHealth = await w.handle.call(WorkerAPI.health, timeout_s=timeout_s)
        except (WorkerDiedError, TimeoutError, Exception) as e:  # noqa: BLE001 - any failure means down
            if w.up:
                log.warning("%s is down: %s", w.handle.name, e)
            w.up = False
            return
        if w.health is not None and h.started_at != w.health.started_at:
            w.restarts += 1
            log.warning("%s restarted (pid %d -> %d)", w.handle.name, w.health.pid, h.pid)
        w.health, w.last_seen = h, time.monotonic()
        w.up = h.engine_alive

    async def wait_up(self, index: int, timeout_s: float) -> bool:
        """Probe one worker until it answers (e.g. after a restart), within a deadline."""
        deadline = time.monotonic() + timeout_s
        w = self.workers[index]
        while time.monotonic() < deadline:
            await self._probe(w, timeout_s=max(min(5.0, deadline - time.monotonic()), 0.1))
            if w.up:
                return True
            await asyncio.sleep(0.2)
        return False

    def mark_down(self, handle: WorkerHandle) -> None:
        self.workers[handle.index].up = False

    def mark_down_named(self, name: str) -> None:
        for w in self.workers:
            if w.handle.name == name:
                w.up = False

    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers if w.up]

    def may_recover(self) -> bool:
        """Some worker is down that Ray may still bring back (its restarts are not all
        spent): a request may wait for it instead of failing."""
        limit = self.resources.max_restarts
        return self.use_ray and any(not w.up and (limit < 0 or w.restarts < limit) for w in self.workers)

    async def drain(self, timeout_s: float) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await asyncio.gather(
            *(w.handle.call(WorkerAPI.drain, timeout_s, timeout_s=timeout_s + 5) for w in self.workers if w.up),
            return_exceptions=True,
        )
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w.handle.target, no_restart=True)
