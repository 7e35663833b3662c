"""The serving cluster: a prefill pool and a decode pool (or one colocated pool), and
the handoff that carries one request across them.

    reserve on D ──► prefill on P (pages stream P→D layer by layer) ──► first token
        ──► decode on D (streams the rest)

Failure semantics, each with a deadline:
- the transfer fails or times out: D recomputes the prompt itself (counted there);
- P dies or times out: D recomputes (P's pool restarts it);
- D dies before any token reached the caller: the request is retried on another D;
  after that, the caller gets WorkerDiedError.
Placement here is deliberately simple (round-robin prefill, least-loaded decode); the
router's KV-aware policy plugs in through ``choose``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from cluster.config import ClusterConfig
from cluster.kv_layout import LayoutMismatchError
from cluster.pool import Resources, WorkerPool, WorkerState
from cluster.worker_handle import WorkerDiedError
from workers.engine import CapacityError, RequestOutput
from workers.sampling_params import SamplingParams
from workers.worker import WorkerSpec

log = logging.getLogger(__name__)


class NoWorkerError(RuntimeError):
    """No healthy worker can take the request (the caller should answer 503)."""


@dataclass
class ClusterCounters:
    requests: int = 0
    prefill_failures: int = 0  # prefill worker died or timed out: decode recomputed
    decode_retries: int = 0  # decode worker died before the first token: retried elsewhere
    shadow_samples: int = 0  # lossy handoffs also decoded on full KV (shadow sampling)


Chooser = Callable[[list[WorkerState], list[WorkerState], list[int]], tuple[WorkerState | None, WorkerState]]


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
        engine = config.engine_config()
        dl = config.deadlines
        # Colocated workers hand a compressed request's KV to themselves in process (the
        # same encode/decode path, no wire), so "compressed vs full" is measurable there too.
        transport = "inprocess" if pools.colocated else config.transfer.transport

        def specs(role: str, n: int) -> list[WorkerSpec]:
            return [
                WorkerSpec(role, i, engine, transport, dl.token_s, dl.transfer_s, dl.prefill_s,
                           layerwise=config.transfer.layerwise, compression=config.transfer.compression,
                           metrics_host=config.metrics.host,
                           metrics_port=config.metrics.worker_port if config.metrics.enabled else None)
                for i in range(n)
            ]

        if pools.colocated:
            self.prefill = None
            self.decode = WorkerPool("colocated", specs("colocated", pools.decode_workers), res(pools.decode_resources), use_ray)
        else:
            self.prefill = WorkerPool("prefill", specs("prefill", pools.prefill_workers), res(pools.prefill_resources), use_ray)
            self.decode = WorkerPool("decode", specs("decode", pools.decode_workers), res(pools.decode_resources), use_ray)

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

    def _place(
        self, prompt: list[int], exclude: set[str], prefer: tuple[str | None, str] | None = None
    ) -> tuple[WorkerState | None, WorkerState]:
        decode = [w for w in self.decode.healthy() if w.handle.name not in exclude]
        if not decode:
            raise NoWorkerError(f"no healthy {self.decode.role} worker")
        prefill = [] if self.prefill is None else self.prefill.healthy()
        if self.prefill is not None and not prefill:
            raise NoWorkerError("no healthy prefill worker")
        if prefer is not None:  # the router's decision, if those workers are still up
            p = next((w for w in prefill if w.handle.name == prefer[0]), None)
            d = next((w for w in decode if w.handle.name == prefer[1]), None)
            if d is not None and (p is not None or self.prefill is None):
                return p, d
        return self._choose(prefill, decode, prompt)

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
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; tokens are never repeated across retries.
        ``placement`` (prefill name or None, decode name) is the router's choice; it is
        used while those workers are up, and a retry falls back to the default policy.
        ``compression`` names a preset for this request's KV payload (None: the
        deployment's ``transfer.compression``); an unknown name raises ValueError."""
        self.config.transfer.compression.resolve(compression)  # ValueError before any work
        rid = request_id or f"req-{uuid.uuid4().hex}"
        self.counters.requests += 1
        emitted = 0
        tried: set[str] = set()
        timeouts = 0
        while True:
            p, d = self._place(prompt, tried, None if tried else placement)
            try:
                async for out in self._attempt(rid, prompt, params, p, d, compression):
                    fresh = out.new_token_ids[max(0, emitted - (out.num_output_tokens - len(out.new_token_ids))):]
                    emitted = max(emitted, out.num_output_tokens)
                    yield RequestOutput(out.request_id, fresh, out.new_logprobs[-len(fresh):] if fresh and out.new_logprobs else [],
                                        out.finished, out.finish_reason, out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens,
                                        out.prompt_logprobs)
                return
            except TimeoutError as e:
                # A worker that did not answer in time, before anything reached the
                # caller: try once more (the abort in _attempt freed its reservation).
                timeouts += 1
                if emitted > 0 or timeouts > 1:
                    raise
                log.warning("%s: %s; retrying once", rid, e)
            except CapacityError:
                # this decode worker's KV pool is full right now: try another, else give up
                tried.add(d.handle.name)
                if not [w for w in self.decode.healthy() if w.handle.name not in tried]:
                    raise
            except WorkerDiedError as e:
                self.decode.mark_down(d.handle)
                tried.add(d.handle.name)
                if emitted > 0 or not [w for w in self.decode.healthy() if w.handle.name not in tried]:
                    raise
                self.counters.decode_retries += 1
                log.warning("%s: %s; retrying on another decode worker", rid, e)

    async def _attempt(
        self, rid: str, prompt: list[int], params: SamplingParams, p: WorkerState | None, d: WorkerState,
        compression: str | None,
    ) -> AsyncIterator[RequestOutput]:
        dl = self.config.deadlines
        if p is None:  # colocated
            async for out in d.handle.stream("generate", rid, prompt, params, compression, item_timeout_s=dl.token_s):
                yield out
            return
        desc = await d.handle.call("reserve", rid, prompt, params, p.layout, compression, timeout_s=dl.reserve_s)
        finished = False
        try:
            first = None
            try:
                first = await p.handle.call("prefill", rid, prompt, params, desc, timeout_s=dl.prefill_s)
            except (WorkerDiedError, TimeoutError) as e:
                self.counters.prefill_failures += 1
                self.prefill.mark_down(p.handle)
                log.warning("%s: prefill on %s failed (%s); decode worker recomputes", rid, p.handle.name, e)
            shadow = None
            if first is not None:
                shadow = self._maybe_shadow(rid, prompt, params, p, desc.plan, first.first_token)
                yield RequestOutput(rid, [first.first_token], [first.first_logprobs] if first.first_logprobs else [],
                                    False, None, first.num_prompt_tokens, first.num_cached_tokens, 1, first.prompt_logprobs)
            args = (rid, first.first_token, first.first_logprobs, first.rng_state) if first else (rid, None)
            seen = [first.first_token] if first is not None else []
            async for out in d.handle.stream("decode", *args, item_timeout_s=dl.token_s):
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

    # ---- shadow sampling ----------------------------------------------------------------

    def _maybe_shadow(self, rid, prompt, params, p: WorkerState, plan, first_token: int):
        """Start a full-KV greedy decode of the first k tokens on the prefill worker for
        a sampled fraction of greedy requests with a lossy payload: (task, k) or None."""
        comp = self.config.transfer.compression
        if plan.identity or not params.greedy or comp.shadow_fraction <= 0 or self._shadow_rng.random() >= comp.shadow_fraction:
            return None
        k = min(comp.shadow_tokens, params.max_tokens)
        self.counters.shadow_samples += 1
        call = p.handle.call("shadow_decode", rid, prompt, first_token, k, timeout_s=self.config.deadlines.prefill_s)
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
            await w.handle.call("abort", rid, timeout_s=5.0)
        except Exception as e:  # the worker may be gone; its restart frees everything anyway
            log.debug("abort %s on %s: %s", rid, w.handle.name, e)

    # ---- introspection ----------------------------------------------------------------

    async def worker_stats(self) -> list[dict]:
        out = []
        for pool in self.pools:
            for w in pool.workers:
                try:
                    out.append(await w.handle.call("stats", timeout_s=5.0))
                except Exception as e:  # down workers report as such
                    out.append({"role": pool.role, "index": w.handle.index, "error": str(e)})
        return out


__all__ = ["KVRelayCluster", "NoWorkerError", "CapacityError", "LayoutMismatchError"]
