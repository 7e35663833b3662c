"""The serving cluster: a prefill pool and a decode pool (or one colocated pool), and
the handoff that carries one request across them.

    admit (reserve on D, or wait in D's pool queue) ──► prefill on P (pages stream
        P→D layer by layer) ──► first token ──► decode on D (streams the rest)

What happens on each failure is ``cluster/retry.py``'s table (retry elsewhere before
the first token, migrate after it, recompute on D when the prefill or the transfer
fails); waiting for KV is ``cluster/admission.py``. Placement, first attempt and every
retry, is one chooser: the router's policy when the router passes its ``placer``,
else a least-loaded default for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from cluster.admission import AdmissionQueue, AdmissionRejected, PoolUnavailable
from cluster.config import ClusterConfig
from cluster.kv_layout import LayoutMismatchError
from cluster.pool import Resources, WorkerPool, WorkerState
from cluster.retry import Step, next_step
from cluster.worker_api import (
    CapacityError, RequestOutput, SamplingParams, TransferDescriptor, WorkerAPI, WorkerDiedError, WorkerSpec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoWorkerError(RuntimeError):
    """No healthy worker can take the request (the caller should answer 503)."""


@dataclass
class ClusterCounters:
    requests: int = 0
    prefill_failures: int = 0  # prefill worker died or timed out: decode recomputed
    decode_retries: int = 0  # a decode worker failed before the first token: retried elsewhere
    migrations: int = 0  # a decode worker failed after tokens were sent: continued elsewhere
    shadow_samples: int = 0  # lossy handoffs also decoded on full KV (shadow sampling)


Chooser = Callable[[list[WorkerState], list[WorkerState], list[int]], tuple[WorkerState | None, WorkerState]]
# The router's placement for one request: (prompt, workers to avoid) -> (prefill name or
# None, decode name); raises when no allowed worker is left.
Placer = Callable[[list[int], frozenset[str]], tuple[str | None, str]]


class KVRelayCluster:
    def __init__(self, config: ClusterConfig, use_ray: bool = True, choose: Chooser | None = None) -> None:
        self.config = config
        self.use_ray = use_ray
        self.counters = ClusterCounters()
        self._rr = itertools.count()
        self._choose = choose or self._default_choice
        # Shadow sampling result: (preset label, fraction of the first k greedy tokens
        # identical to full KV); the router exports it as a histogram.
        self.on_shadow: Callable[[str, float], None] | None = None
        self._shadow_rng = random.Random(0)
        self._background: set[asyncio.Task] = set()
        pools = config.pools

        def res(custom: dict[str, float]) -> Resources:
            return Resources(pools.cpus_per_worker, pools.gpus_per_worker, pools.max_restarts, tuple(sorted(custom.items())))
        dl = config.deadlines
        # Colocated workers hand a compressed request's KV to themselves in process (the
        # same encode/decode path, no wire), so "compressed vs full" is measurable there too.
        transport = "inprocess" if pools.colocated else config.transfer.transport

        def specs(role: str, n: int) -> list[WorkerSpec]:
            return [
                WorkerSpec(role, i, config.engine_config(role), transport, dl.token_s, dl.transfer_s, dl.prefill_s,
                           layerwise=config.transfer.layerwise, compression=config.transfer.compression,
                           metrics_host=config.metrics.host,
                           metrics_port=config.metrics.worker_port if config.metrics.enabled else None,
                           heap_trim_s=pools.heap_trim_s)
                for i in range(n)
            ]

        if pools.colocated:
            self.prefill = None
            self.decode = WorkerPool("colocated", specs("colocated", pools.decode_workers), res(pools.decode_resources), use_ray)
        else:
            self.prefill = WorkerPool("prefill", specs("prefill", pools.prefill_workers), res(pools.prefill_resources), use_ray)
            self.decode = WorkerPool("decode", specs("decode", pools.decode_workers), res(pools.decode_resources), use_ray)
        # Requests waiting for KV on the decode (or colocated) pool; the router observes
        # every wait through on_admission_wait (pool, seconds).
        adm = config.admission
        self.on_admission_wait: Callable[[str, float], None] | None = None
        self.admission = AdmissionQueue(self.decode.role, adm.max_queued, adm.queue_timeout_s, adm.retry_after_s,
                                        on_wait=self._observe_wait)

    def _observe_wait(self, pool: str, seconds: float) -> None:
        if self.on_admission_wait is not None:
            self.on_admission_wait(pool, seconds)

    @property
    def pools(self) -> list[WorkerPool]:
        return [p for p in (self.prefill, self.decode) if p is not None]

    async def start(self) -> None:
        dl = self.config.deadlines
        await asyncio.gather(*(p.start(dl.startup_s) for p in self.pools))
        for p in self.pools:
            p.start_probing(dl.health_interval_s, dl.health_timeout_s)

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.drain(self.config.deadlines.drain_s) for p in self.pools), return_exceptions=True)

    # ---- placement --------------------------------------------------------------------

    def _default_choice(self, prefill: list[WorkerState], decode: list[WorkerState], prompt: list[int]):
        p = prefill[next(self._rr) % len(prefill)] if prefill else None
        d = min(decode, key=lambda w: (w.health.running + w.health.waiting if w.health else 0, -(w.health.free_blocks if w.health else 0)))
        return p, d

    def _place(self, prompt: list[int], exclude: set[str], first: tuple[str | None, str] | None,
               placer: Placer | None, avoid: set[str] = frozenset()) -> tuple[WorkerState | None, WorkerState]:
        """Healthy workers for one attempt, never one of ``exclude`` (no room now) and
        not one of ``avoid`` (late before) unless nothing else is left: the router's
        first decision while its workers are up and allowed, else the placer (the
        router's policy), else the default chooser. Raises NoWorkerError."""
        healthy = [w for w in self.decode.healthy() if w.handle.name not in exclude]
        if not [w for w in healthy if w.handle.name not in avoid]:
            avoid = frozenset()  # a worker that was late beats no worker
        exclude = set(exclude) | set(avoid)
        decode = [w for w in healthy if w.handle.name not in exclude]
        if not decode:
            raise NoWorkerError(f"no healthy {self.decode.role} worker" + (f" besides {sorted(exclude)}" if exclude else ""))
        prefill = [] if self.prefill is None else self.prefill.healthy()
        if self.prefill is not None and not prefill:
            raise NoWorkerError("no healthy prefill worker")
        by_name = {w.handle.name: w for w in prefill + decode}
        # A prefill name of None: the decode worker prefills too (colocated, or the
        # router's local prefill).
        if first is not None and first[1] in by_name and (first[0] is None or first[0] in by_name):
            return (by_name[first[0]] if first[0] else None), by_name[first[1]]
        if placer is not None:
            try:
                p_name, d_name = placer(prompt, frozenset(exclude) | self._down())
            except Exception as e:  # the policy found no allowed worker
                raise NoWorkerError(str(e)) from None
            d = by_name.get(d_name)
            p = by_name.get(p_name) if p_name else None
            if d is not None and (p is not None or p_name is None):
                return p, d
        return self._choose(prefill, decode, prompt)

    def restarting(self) -> bool:
        """Some pool has no worker up, but one of its workers may come back (Ray is
        restarting it): a request waits for it in the admission queue, within the
        queue's deadline, rather than failing."""
        return any(not pool.healthy() and pool.may_recover() for pool in self.pools)

    def _unavailable(self, e: BaseException) -> PoolUnavailable:
        """What a queued request waits on when placement found no worker: the first pool
        with none up (Ray restarting it), else the decode pool (none with room)."""
        down = [p.role for p in self.pools if not p.healthy()]
        return PoolUnavailable(str(e), down[0] if down else self.decode.role)

    async def wait_for_workers(self, place: Callable[[], T], unavailable: type[BaseException] | tuple = NoWorkerError) -> T:
        """``place()``, the router's first placement of a fresh request, which just raised
        ``unavailable`` (no worker of a pool is up): tried again from the admission
        queue while ``restarting()``. Returns its result; raises its error when no
        worker can come back, AdmissionRejected when the queue is full or the wait
        passes its deadline (503 + Retry-After either way)."""
        async def attempt() -> T:
            try:
                return place()
            except unavailable as e:
                if self.restarting():
                    raise self._unavailable(e) from None
                raise

        return await self.admission.admit(attempt)

    def _down(self) -> frozenset[str]:
        return frozenset(w.handle.name for pool in self.pools for w in pool.workers if not w.up)

    def worker_states(self) -> dict[str, list[WorkerState]]:
        """Every worker of every pool, by pool role (what placement looks at)."""
        return {p.role: list(p.workers) for p in self.pools}

    # ---- one request ------------------------------------------------------------------

    async def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        placement: tuple[str | None, str] | None = None,
        compression: str | None = None,
        placer: Placer | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs: every token exactly once, in order, across
        retries and migrations (``cluster/retry.py``). ``placement`` (prefill name or
        None, decode name) is the router's first choice; ``placer`` places every later
        attempt (the router's policy; default: the cluster's chooser).
        ``compression`` names a preset for this request's KV payload (None: the
        deployment's ``transfer.compression``); an unknown name raises ValueError."""
        self.config.transfer.compression.resolve(compression)  # ValueError before any work
        rid = request_id or f"req-{uuid.uuid4().hex}"
        self.counters.requests += 1
        sent: list[int] = []  # token ids the caller has
        rng_state: bytes | None = None  # the sampling RNG after the last token sent
        cached_tokens: int | None = None
        exclude: set[str] = set()
        for attempt in itertools.count(1):
            # Migration: the tokens sent so far become part of the prompt.
            a_prompt = prompt + sent
            a_params = params if not sent else dataclasses.replace(
                params, max_tokens=params.max_tokens - len(sent), min_tokens=max(0, params.min_tokens - len(sent)))
            a_rid = rid if attempt == 1 else f"{rid}~{attempt}"
            d_name = None
            try:
                p, d, desc = await self._admit(a_rid, a_prompt, a_params, compression, exclude,
                                               placement if attempt == 1 else None, placer, retry=attempt > 1)
                d_name = d.handle.name
                emitted = 0  # this attempt's output tokens already passed on
                async for out in self._run(a_rid, a_prompt, a_params, p, d, desc, compression, rng_state):
                    # A decode worker whose first output repeats the prefill's first token
                    # (the first token already ended the request): pass each token on once.
                    fresh = out.new_token_ids[max(0, emitted - (out.num_output_tokens - len(out.new_token_ids))):]
                    emitted = max(emitted, out.num_output_tokens)
                    sent += fresh
                    rng_state = out.rng_state if out.rng_state is not None else rng_state
                    if cached_tokens is None:
                        cached_tokens = out.num_cached_tokens
                    yield dataclasses.replace(out, request_id=rid, new_token_ids=fresh,
                                              new_logprobs=out.new_logprobs[-len(fresh):] if fresh and out.new_logprobs else [],
                                              num_prompt_tokens=len(prompt), num_cached_tokens=cached_tokens,
                                              num_output_tokens=len(sent))
                return
            except (WorkerDiedError, TimeoutError) as e:
                failed = d_name or _worker_of(e, self.decode)
                if failed is not None and isinstance(e, WorkerDiedError):
                    # Down until its pool's probe sees it back (Ray restarts it): then it
                    # is as good a target as any, so it is not excluded for good.
                    self.decode.mark_down_named(failed)
                elif failed is not None:
                    exclude.add(failed)  # alive but late: elsewhere if any other worker is up
                step = next_step(e, len(sent), attempt, self.config.admission.max_attempts)
                if step is Step.FAIL:
                    raise
                if step is Step.MIGRATE:
                    self.counters.migrations += 1
                else:
                    self.counters.decode_retries += 1
                log.warning("%s: %s after %d tokens; %s on another worker", rid, e, len(sent), step.value)

    async def _admit(
        self, rid: str, prompt: list[int], params: SamplingParams, compression: str | None, exclude: set[str],
        first: tuple[str | None, str] | None, placer: Placer | None, retry: bool,
    ) -> tuple[WorkerState | None, WorkerState, TransferDescriptor | None]:
        """Place and reserve on a decode worker, waiting in its pool's queue while none
        has room. Colocated: place only (the worker's own scheduler queues)."""
        if self.prefill is None:
            async def colocated():
                try:
                    return self._place(prompt, set(), first, placer, avoid=exclude)
                except NoWorkerError as e:
                    if retry or self.restarting():  # wait for a worker to come back
                        raise self._unavailable(e) from None
                    raise
            p, d = await self.admission.admit(colocated, retry=retry)
            return None, d, None

        dl = self.config.deadlines

        async def attempt():
            full: set[str] = set()  # decode workers that said CapacityError just now
            while True:
                try:
                    p, d = self._place(prompt, full, None if full else first, placer, avoid=exclude)
                except NoWorkerError as e:
                    if full:  # up, but no room
                        raise CapacityError(str(e)) from None
                    if retry or self.restarting():
                        raise self._unavailable(e) from None
                    raise
                if p is None:  # local prefill: D runs the whole request; its scheduler queues it
                    return None, d, None
                try:
                    desc = await d.handle.call(WorkerAPI.reserve, rid, prompt, params, p.layout, compression,
                                               timeout_s=dl.reserve_s)
                    return p, d, desc
                except CapacityError:
                    full.add(d.handle.name)

        return await self.admission.admit(attempt, retry=retry)

    async def _run(
        self, rid: str, prompt: list[int], params: SamplingParams, p: WorkerState | None, d: WorkerState,
        desc: TransferDescriptor | None, compression: str | None, rng_state: bytes | None,
    ) -> AsyncIterator[RequestOutput]:
        dl = self.config.deadlines
        if p is None:  # colocated, or a local prefill on the decode worker: one engine runs it all
            try:
                async for out in d.handle.stream(WorkerAPI.generate, rid, prompt, params, compression, rng_state,
                                                 item_timeout_s=dl.token_s):
                    yield out
            finally:
                self.admission.wake()
            return
        finished = False
        try:
            first = None
            try:
                first = await p.handle.call(WorkerAPI.prefill, rid, prompt, params, desc, rng_state, timeout_s=dl.prefill_s)
            except (WorkerDiedError, TimeoutError) as e:
                self.counters.prefill_failures += 1
                self.prefill.mark_down(p.handle)
                log.warning("%s: prefill on %s failed (%s); decode worker recomputes", rid, p.handle.name, e)
            shadow = None
            if first is not None:
                shadow = self._maybe_shadow(rid, prompt, params, p, desc.plan, first.first_token)
                yield RequestOutput(rid, [first.first_token], [first.first_logprobs] if first.first_logprobs else [],
                                    False, None, first.num_prompt_tokens, first.num_cached_tokens, 1, first.rng_state,
                                    first.prompt_logprobs)
            args = (rid, first.first_token, first.first_logprobs, first.rng_state) if first else (rid, None, None, rng_state)
            seen = [first.first_token] if first is not None else []
            async for out in d.handle.stream(WorkerAPI.decode, *args, item_timeout_s=dl.token_s):
                finished = out.finished  # before yielding: the caller may stop at the last one
                if shadow is not None:
                    seen += out.new_token_ids
                    if out.finished or len(seen) >= shadow[1]:
                        self._spawn(self._score_shadow(shadow[0], seen[: shadow[1]], desc.plan.preset))
                        shadow = None
                yield out
        finally:
            if not finished:  # cancelled, failed or abandoned: free the blocks on D
                await self._abort_quietly(d, rid)
            self.admission.wake()  # its KV is free: the head of the queue may fit now

    # ---- shadow sampling ----------------------------------------------------------------

    def _maybe_shadow(self, rid, prompt, params, p: WorkerState, plan, first_token: int):
        """Start a full-KV greedy decode of the first k tokens on the prefill worker for
        a sampled fraction of greedy requests with a lossy payload: (task, k) or None."""
        comp = self.config.transfer.compression
        if plan.identity or not params.greedy or comp.shadow_fraction <= 0 or self._shadow_rng.random() >= comp.shadow_fraction:
            return None
        k = min(comp.shadow_tokens, params.max_tokens)
        self.counters.shadow_samples += 1
        call = p.handle.call(WorkerAPI.shadow_decode, rid, prompt, first_token, k, timeout_s=self.config.deadlines.prefill_s)
        return asyncio.ensure_future(call), k

    async def _score_shadow(self, task: asyncio.Future, seen: list[int], preset: str) -> None:
        try:
            full = await task
        except Exception as e:  # a shadow never affects the request
            log.debug("shadow decode failed: %s", e)
            return
        n = min(len(full), len(seen))
        agree = next((i for i in range(n) if full[i] != seen[i]), n)
        if self.on_shadow is not None and n:
            self.on_shadow(preset, agree / n)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, w: WorkerState, rid: str) -> None:
        try:
            await w.handle.call(WorkerAPI.abort, rid, timeout_s=5.0)
        except Exception as e:  # the worker may be gone; its restart frees everything anyway
            log.debug("abort %s on %s: %s", rid, w.handle.name, e)

    # ---- introspection ----------------------------------------------------------------

    async def worker_stats(self) -> list[dict]:
        out = []
        for pool in self.pools:
            for w in pool.workers:
                try:
                    out.append(await w.handle.call(WorkerAPI.stats, timeout_s=5.0))
                except Exception as e:  # down workers report as such
                    out.append({"role": pool.role, "index": w.handle.index, "error": str(e)})
        return out


def _worker_of(e: BaseException, pool: WorkerPool) -> str | None:
    """The decode worker a handle error names (``"decode-1 died during reserve"``)."""
    text = str(e)
    return next((w.handle.name for w in pool.workers if text.startswith((w.handle.name + " ", w.handle.name + "."))), None)


__all__ = ["KVRelayCluster", "NoWorkerError", "CapacityError", "LayoutMismatchError", "AdmissionRejected", "Placer"]
