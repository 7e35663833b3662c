"""The router's core, independent of HTTP: tokenize, check, place by residency, run
the request on the cluster, detokenize and apply stop strings, keep the residency
index exact from the workers' KV events, and count what happened.

    prompt ─► tokens ─► block hashes ─► index.match per pool ─► policy.choose(P, D)
                                                        │
    text deltas ◄─ TextStream (detok + stops) ◄─ cluster.generate(prompt, placement)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.block_hash import BlockHasher
from cluster.cluster import KVRelayCluster, NoWorkerError
from cluster import heap_trim
from cluster.config import ClusterConfig
from cluster.launcher import start_cluster, stop_cluster
from cluster.worker_api import CapacityError, SamplingParams, TokenLogprobs, WorkerAPI
from router.detokenizer import TextStream
from router.metrics import IndexView, ReliabilityView, RouterMetrics, WorkerView
from router.live_prefixes import LivePrefixes
from router.pending_prefixes import PendingPrefixes
from router.placement import NoWorkerError as NoCandidateError
from router.placement import Placement, PlacementRequest, WorkerSnapshot, make_policy
from router.residency_index import ResidencyIndex, WorkerMode
from router.tokenizer import load_tokenizer
from workers.loader import read_model_config, resolve_model

log = logging.getLogger(__name__)

PROBE_TEXT = (
    "kvrelay start-up self-check: the router and the workers must agree on the tokenizer, "
    "the chat template and the block hash function, or KV-aware placement is blind."
)


# A KV-event drain waits for its worker's step in progress: the pump applies what came
# back within DRAIN_WAIT_S and lets the rest run on; a call is given up (its events
# lost, the worker resynced from its snapshot) only after DRAIN_TIMEOUT_S, as long as
# the engine thread itself waits for a caller's function (AsyncEngine.run_on_engine).
DRAIN_WAIT_S = 1.0
DRAIN_TIMEOUT_S = 30.0


@dataclass
class _Drain:
    """One worker's KV-event drain in flight."""

    call: asyncio.Future  # -> list[KVEvent]
    prefilled: frozenset[int]  # pending-prefix handles prefilled before it began
    handle: object  # the worker's handle (its snapshot is fetched through it on a gap)


class SelfCheckError(RuntimeError):
    """Router and workers disagree on tokens or block hashes."""


@dataclass
class ChoiceEvent:
    """What one choice produced since the last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None  # "stop" | "length" once finished
    # On a choice's first event when its parameters asked for prompt logprobs (echo):
    # per prompt position, that token's logprob (position 0: None).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class RequestResult:
    """Usage of a whole request (all choices), filled while it runs."""

    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    placement: Placement | None = None
    arrival: float = field(default_factory=time.monotonic)  # when the router got the request
    first_token_seen: bool = False


class RouterService:
    def __init__(self, config: ClusterConfig) -> None:
        # The deployment's secret block-hash seed (configured, or fresh now): start()
        # hands this same config to every worker, so they hash alike.
        self.config = config = config.with_hash_seed()
        self.source = resolve_model(config.engine.model)
        self.model_id = config.router.served_model_name or self.source.model_id
        self.model_config = read_model_config(self.source)
        self.max_model_len = config.engine.max_model_len or self.model_config.max_position_embeddings
        self.block_size = config.engine.block_size
        self.hasher = BlockHasher(self.block_size, config.prefix_cache.seed_bytes())
        self.tokenizer = load_tokenizer(self.source)
        self.policy_name = config.router.policy
        self.policy = make_policy(config.router.policy, **policy_options(config))
        roles = ["colocated"] if config.pools.colocated else ["prefill", "decode"]
        self.indexes = {r: ResidencyIndex(max_blocks=config.router.index_max_blocks) for r in roles}
        self.metrics = RouterMetrics(self._worker_views, self._index_views, self._reliability_view)
        self.cluster: KVRelayCluster | None = None
        self.ready = False
        self.inflight = 0
        self.inflight_by_key: dict[str, int] = {}  # API key -> requests in flight (router.max_inflight_per_key)
        self.pending_prefixes = PendingPrefixes()  # prompts placed on a worker, not prefilled yet
        self._placed: dict[str, int] = {}  # requests this router placed on a worker, still running
        self._queued_tokens: dict[str, int] = {}  # uncached prompt tokens placed on a worker, no first token yet
        self.live_prefixes = LivePrefixes(config.router.live_prefix_window_s)  # conversations per compute worker
        self._block_bytes = {}  # compression preset -> bytes shipped per block
        self._started_at: dict[str, float] = {}
        self._drains: dict[str, _Drain] = {}  # worker -> its KV-event drain in flight
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        heap_trim.start(self.config.pools.heap_trim_s)  # this process too: bursts leave free heap
        self.cluster = await start_cluster(self.config)
        self.cluster.on_shadow = lambda preset, agreement: self.metrics.shadow_agreement.labels(preset).observe(agreement)
        self.cluster.on_admission_wait = lambda pool, seconds: self.metrics.admission_wait.labels(pool).observe(seconds)
        for pool in self.cluster.pools:  # exists at 0 from the start (a wait is counted against the
            self.metrics.admission_wait.labels(pool.role)  # pool waited on: a restarting prefill's too)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._event_loop())]
        for states in self.cluster.worker_states().values():  # every series exists from the start
            for w in states:
                self.metrics.decisions.labels(self.policy_name, w.handle.name)
        await self.self_check()
        self.ready = True
        log.info("router ready: model %s, policy %s, pools %s", self.model_id, self.policy_name, list(self.indexes))

    async def stop(self) -> None:
        self.ready = False
        for t in self._tasks:
            t.cancel()
        for d in self._drains.values():
            d.call.cancel()
        self._drains.clear()
        if self.cluster is not None:
            await stop_cluster(self.cluster)

    # ---- the residency index: fed by KV events ------------------------------------------

    async def pump_events(self) -> None:
        """Drain every up worker's KV events into its pool's index (resync after a gap
        or a restart). Never blocks on a dead worker beyond a short deadline.

        The drains run concurrently, one call in flight per worker, and a call is never
        abandoned while it may still return events. A drain runs on the worker's engine
        thread between steps, so it waits for the step in progress (a 2,048-token
        prefill step takes seconds on a loaded CPU); the pump applies the drains that
        came back within ``DRAIN_WAIT_S`` and leaves the others running for the next
        pump. Before, each worker was drained in turn with a 2 s timeout: a timed-out
        call still emptied the worker's queue, its events were lost, the next drain saw
        a gap, and the worker's whole index was dropped until its snapshot came back
        (bench/serving_mooncake_diagnosis.py; serving-mooncake.md's Reading).

        Prompts prefilled before a worker's drain began leave the pending prefixes once
        that drain is applied and the worker's index is exact (router/pending_prefixes.py)."""
        states = self.cluster.worker_states()
        down = set()
        for role, ws in states.items():
            for w in ws:
                name = w.handle.name
                if not w.up or w.health is None:
                    down.add(name)  # what it held is not known either way
                    continue
                if self._started_at.get(name) not in (None, w.health.started_at):
                    self.indexes[role].invalidate(name, "worker restarted")
                self._started_at[name] = w.health.started_at
                if name not in self._drains:
                    call = w.handle.call(WorkerAPI.kv_events, timeout_s=DRAIN_TIMEOUT_S)
                    self._drains[name] = _Drain(asyncio.ensure_future(call), self.pending_prefixes.drain_started(), w.handle)
        if self._drains:
            await asyncio.wait([d.call for d in self._drains.values()], timeout=DRAIN_WAIT_S)
        for role, ws in states.items():
            index = self.indexes[role]
            drained, handles, settled = {}, {}, {}
            for w in ws:
                name = w.handle.name
                d = self._drains.get(name)
                if d is None or not d.call.done():
                    continue
                del self._drains[name]
                try:
                    drained[name] = d.call.result()
                except Exception as e:  # a worker that went away is marked down by its pool
                    log.debug("events from %s: %s", name, e)
                    continue
                settled[name], handles[name] = d.prefilled, d.handle
            index.apply_many(drained)  # one vectorised pass over the pool's events that came back
            for name in index.needs_resync():
                if name not in handles:
                    continue
                try:
                    index.resync(name, await handles[name].call(WorkerAPI.kv_snapshot, timeout_s=5.0))
                except Exception as e:
                    log.debug("snapshot of %s: %s", name, e)
            for name, handles_prefilled in settled.items():
                if index.worker_mode(name) is WorkerMode.EXACT:
                    self.pending_prefixes.drained(handles_prefilled, {name})
        self.pending_prefixes.drained(self.pending_prefixes.drain_started(), down)

    async def _event_loop(self) -> None:
        while True:
            await self.pump_events()
            await asyncio.sleep(self.config.router.event_poll_s)

    # ---- what Prometheus sees ----------------------------------------------------------

    def _worker_views(self) -> list[WorkerView]:
        if self.cluster is None:
            return []
        return [WorkerView(role, w.handle.name, w.up, w.restarts)
                for role, states in self.cluster.worker_states().items() for w in states]

    def _index_views(self) -> list[IndexView]:
        return [IndexView(role, i.num_blocks, i.evictions) for role, i in self.indexes.items()]

    def _reliability_view(self) -> ReliabilityView | None:
        if self.cluster is None:
            return None
        q, c = self.cluster.admission, self.cluster.counters
        return ReliabilityView(q.pool, q.depth, dict(q.rejected), c.migrations, c.decode_retries)

    def metrics_targets(self, router_address: str) -> list[dict]:
        """Prometheus HTTP service discovery: this router and every worker's endpoint
        (the worker's last reported address; a restarted worker reports its new one)."""
        groups = [{"targets": [router_address], "labels": {"__metrics_path__": "/metrics"}}]
        if self.cluster is not None:
            addresses = sorted({w.health.metrics_address for states in self.cluster.worker_states().values()
                                for w in states if w.health is not None and w.health.metrics_address})
            if addresses:
                groups.append({"targets": addresses, "labels": {"__metrics_path__": "/metrics"}})
        return groups

    async def self_check(self) -> None:
        """Send a probe and confirm the worker's `stored` events carry the router's own
        block hashes: tokenizer, chat template and hash function agree."""
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}])
        hashes = self.hasher.hash_blocks(prompt)
        if len(hashes) < 2:
            raise SelfCheckError("probe prompt is shorter than two blocks")
        placement = self.place(prompt)
        async for _ in self.cluster.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), "kvrelay-self-check",
                                              (placement.prefill, placement.decode)):
            pass
        role, worker = ((next(r for r in self.indexes if r != "prefill"), placement.decode) if placement.prefill is None
                        else ("prefill", placement.prefill))
        deadline = time.monotonic() + 10.0
        while True:
            await self.pump_events()
            got = self.indexes[role].match(hashes, touch=False).num_blocks(worker)
            if got == len(hashes):
                log.info("self-check passed: %s stored all %d probe blocks with the router's hashes", worker, got)
                return
            if time.monotonic() > deadline:
                raise SelfCheckError(
                    f"self-check failed: {worker} reported {got} of the probe's {len(hashes)} block hashes; "
                    "the router and the workers disagree on tokenizer, chat template or block hashing"
                )
            await asyncio.sleep(0.1)

    # ---- requests in flight (the API's limits) -------------------------------------------

    def enter(self, key: str) -> None:
        self.inflight += 1
        self.inflight_by_key[key] = self.inflight_by_key.get(key, 0) + 1

    def leave(self, key: str) -> None:
        self.inflight -= 1
        left = self.inflight_by_key.get(key, 0) - 1
        if left > 0:
            self.inflight_by_key[key] = left
        else:
            self.inflight_by_key.pop(key, None)

    # ---- placement --------------------------------------------------------------------

    def _snapshots(self, role: str, exclude: frozenset[str] = frozenset(),
                   live: dict[str, int] | None = None) -> list[WorkerSnapshot]:
        """``live``: live conversations per worker (``LivePrefixes.counts``), computed once
        per placement by the caller; read here when not given."""
        out = []
        index = self.indexes[role]
        if live is None:
            live = self.live_prefixes.counts(time.monotonic())
        for w in self.cluster.worker_states().get(role, []):
            h = w.health
            # Health is probed periodically; requests placed since then are not in it yet.
            # Count them, or a burst would all see the same load and land on one worker.
            mine = self._placed.get(w.handle.name, 0)
            running = h.running if h else 0
            out.append(WorkerSnapshot(
                w.handle.name, running, max(h.waiting if h else 0, mine - running),
                h.free_blocks if h else 0, h.total_blocks if h else 1,
                w.up and h is not None and w.handle.name not in exclude,
                index.num_blocks_of(w.handle.name), self._queued_tokens.get(w.handle.name, 0),
                live.get(w.handle.name, 0),
            ))
        return out

    def place(self, prompt: list[int], hashes: list | None = None, compression: str | None = None,
              exclude: frozenset[str] = frozenset(), namespace: str | None = None) -> Placement:
        """The policy's (P, D) for a prompt, never one of ``exclude`` (retries and
        migrations avoid the worker that failed). Raises placement's NoWorkerError.
        ``namespace``: the prefix-cache namespace the prompt is hashed under."""
        hashes = self.hasher.hash_blocks(prompt, namespace) if hashes is None else hashes
        return self._place(prompt, hashes, compression, exclude)[0]

    def _place(self, prompt: list[int], hashes: list, compression: str | None,
               exclude: frozenset[str] = frozenset()) -> tuple[Placement, int]:
        """(P, D) and the prompt tokens the compute worker is expected to hold."""
        colocated = "colocated" in self.indexes
        decode_role = "colocated" if colocated else "decode"
        # What the prefill side holds, or will hold once the prompts already sent there
        # are prefilled (the index alone learns a prefix only after its prefill).
        compute_role = decode_role if colocated else "prefill"
        compute_index = self.indexes[compute_role].match(hashes, touch=False).blocks
        decode_index = compute_index if colocated else self.indexes[decode_role].match(hashes, touch=False).blocks
        pending = self.pending_prefixes.match(hashes)
        compute_match = _longer(compute_index, pending)
        # A decode worker's pending prompts are its local prefills (names are unique across pools).
        decode_match = compute_match if colocated else _longer(decode_index, pending)
        req = PlacementRequest(
            len(prompt), self.block_size,
            prefill_match={} if colocated else compute_match,
            decode_match=decode_match,
            block_bytes=0.0 if colocated else self._shipped_block_bytes(compression),
        )
        live = self.live_prefixes.counts(time.monotonic())
        placement = self.policy.choose(req, [] if colocated else self._snapshots("prefill", exclude, live),
                                       self._snapshots(decode_role, exclude, live))
        for worker in filter(None, (placement.prefill, placement.decode)):
            self.metrics.decisions.labels(self.policy_name, worker).inc()
        for part, value in placement.parts.items():
            self.metrics.placement_cost.labels(self.policy_name, part).observe(value)
        # LRU recency (the index's cap): only the chosen workers' entries are touched.
        # No prefill worker: the decode worker computes (colocated, or a local prefill).
        if placement.prefill is not None:
            self.indexes["prefill"].touch(placement.prefill, hashes, compute_index.get(placement.prefill, 0))
        self.indexes[decode_role].touch(placement.decode, hashes, decode_index.get(placement.decode, 0))
        held = compute_match if placement.prefill is not None else decode_match
        hit = min(held.get(placement.prefill or placement.decode, 0) * self.block_size, len(prompt))
        self.metrics.predicted_hit_tokens.inc(hit)
        return placement, hit

    def _shipped_block_bytes(self, compression: str | None) -> float:
        """Bytes one block costs on the wire under ``compression`` (the deployment's
        preset when None): KV bytes scaled by the preset's kept share and quantization."""
        if compression not in self._block_bytes:
            try:
                _, settings = self.config.transfer.compression.resolve(compression)
            except ValueError:  # an unknown preset is refused where the request is run
                _, settings = self.config.transfer.compression.resolve(None)
            dtype_bytes = self.config.engine_config().resolved_dtype().itemsize
            per_elem = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}.get(settings.quantization, float(dtype_bytes))
            kept = settings.keep if settings.sparse else 1.0
            self._block_bytes[compression] = self.model_config.kv_bytes_per_token * self.block_size * per_elem * kept
        return self._block_bytes[compression]

    # ---- one request ------------------------------------------------------------------

    async def run(
        self, prompt: list[int], params: list[SamplingParams], stop_strings: list[str], result: RequestResult,
        compression: str | None = None,
    ) -> AsyncIterator[ChoiceEvent]:
        """Stream the events of every choice (``len(params)`` choices). Choice 0 runs
        first; once its prompt is prefilled, the other choices start on the same
        workers and reuse that prefix (prefix cache on the prefill worker, dedup on the
        decode worker), so a prompt is prefilled and shipped once."""
        # Hashed under the request's cache namespace, as its workers will: the index
        # answers only with the prefixes this tenant's own requests left behind.
        namespace = params[0].cache_namespace
        hashes = self.hasher.hash_blocks(prompt, namespace)
        try:
            try:
                placement, hit = self._place(prompt, hashes, compression)
            except NoCandidateError:
                # A pool has no worker up: if one is restarting, wait for it in the
                # admission queue (bounded, within its deadline) rather than fail.
                placement, hit = await self.cluster.wait_for_workers(
                    lambda: self._place(prompt, hashes, compression), NoCandidateError)
        except NoCandidateError as e:
            raise NoWorkerError(str(e)) from None
        result.placement = placement
        # The compute worker's queue grows by the tokens it must compute, until the
        # first token comes back (kv_aware weighs work in tokens, not requests).
        compute_worker, queued = placement.prefill or placement.decode, len(prompt) - hit
        self._queued_tokens[compute_worker] = self._queued_tokens.get(compute_worker, 0) + queued
        # The conversation this prompt continues (or starts) is live on its compute worker
        # until the request ends, and a think time after.
        chain = self.live_prefixes.start(compute_worker, hashes, time.monotonic())
        unqueued = False

        def unqueue() -> None:
            nonlocal unqueued
            if not unqueued:
                unqueued = True
                self._queued_tokens[compute_worker] -= queued
        # The prompt's blocks are on their way into this worker's cache until its first token.
        pending = self.pending_prefixes.add(placement.prefill or placement.decode, hashes)
        # Count the request against its workers until the health probes see it: on the
        # prefill worker until its first token (prefill done), on the decode worker
        # until it ends.
        charges = [{"prefill": placement.prefill, "decode": placement.decode} for _ in params]  # per choice
        for c in charges:
            self._charge(c["prefill"])
            self._charge(c["decode"])
        queue: asyncio.Queue = asyncio.Queue()
        rid = f"req-{uuid.uuid4().hex[:16]}"
        prefilled = asyncio.Event()

        async def choice(i: int) -> None:
            if i > 0:
                await prefilled.wait()
            stream = TextStream(self.tokenizer.hf, prompt, stop_strings)
            first_seen = False
            last_at: float | None = None  # when this choice's last tokens arrived
            charged = charges[i]

            def replace(prompt_now: list[int], exclude: frozenset[str]) -> tuple[str | None, str]:
                """A retry or migration: the same policy, the failed workers excluded;
                the request's load moves with it."""
                try:
                    again = self.place(prompt_now, compression=compression, exclude=exclude, namespace=namespace)
                except NoCandidateError as e:
                    raise NoWorkerError(str(e)) from None
                if not first_seen:
                    unqueue()  # the prompt's queued work leaves the failed worker (not re-counted)
                for role in ("decode",) if first_seen else ("prefill", "decode"):
                    self._unplace(charged[role])  # a no-op for None
                    charged[role] = getattr(again, role)
                    self._charge(charged[role])
                return again.prefill, again.decode

            try:
                async for out in self.cluster.generate(prompt, params[i], f"{rid}-{i}", (placement.prefill, placement.decode),
                                                       compression, placer=replace):
                    if out.new_token_ids:
                        self._observe_tokens(result, len(out.new_token_ids), last_at)
                        last_at = time.monotonic()
                    if not first_seen:
                        first_seen = True
                        self._unplace(charged["prefill"])
                        charged["prefill"] = None  # counted on the prefill worker until its first token
                        unqueue()
                        # stays matched until the index has drained its stored blocks
                        self.pending_prefixes.prefilled(pending)
                    if i == 0 and not prefilled.is_set():
                        prefilled.set()
                        result.cached_tokens = out.num_cached_tokens
                    result.completion_tokens += len(out.new_token_ids)
                    delta = stream.add(out.new_token_ids)
                    plp = out.prompt_logprobs
                    if delta.stopped:
                        await queue.put(ChoiceEvent(i, delta.text, out.new_token_ids, out.new_logprobs, "stop", plp))
                        return  # leaving the generator aborts the request on its workers
                    if out.finished:
                        tail = stream.finish()
                        await queue.put(ChoiceEvent(i, delta.text + tail.text, out.new_token_ids, out.new_logprobs,
                                                    out.finish_reason, plp))
                        return
                    await queue.put(ChoiceEvent(i, delta.text, out.new_token_ids, out.new_logprobs, None, plp))
            except BaseException as e:
                await queue.put(e)
                raise
            finally:
                prefilled.set()
                if not first_seen:
                    unqueue()

        tasks = [asyncio.create_task(choice(i)) for i in range(len(params))]
        done = 0
        try:
            while done < len(tasks):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    done += 1
                    if done == len(tasks):
                        self.metrics.e2e.observe(time.monotonic() - result.arrival)
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in charges:  # every choice has ended (or never started)
                self._unplace(c["prefill"])
                self._unplace(c["decode"])
            self.pending_prefixes.end(pending)  # a prefilled prompt waits for its drain
            self.live_prefixes.finish(chain, time.monotonic())

    def _observe_tokens(self, result: RequestResult, n: int, previous_at: float | None) -> None:
        """Tokens of one choice arrived: TTFT at the request's first, otherwise the gap
        since this choice's last tokens, spread over the tokens that gap produced."""
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens.inc(n)
        if previous_at is not None:
            for _ in range(n):
                m.itl.observe((now - previous_at) / n)
        elif not result.first_token_seen:
            result.first_token_seen = True
            m.ttft.observe(now - result.arrival)
            m.prompt_tokens.inc(result.prompt_tokens)

    def _charge(self, worker: str | None) -> None:
        if worker is not None:
            self._placed[worker] = self._placed.get(worker, 0) + 1

    def _unplace(self, worker: str | None) -> None:
        if worker is not None:
            self._placed[worker] -= 1


def policy_options(config: ClusterConfig) -> dict[str, float]:
    """The configured weights of the configured policy (only kv_aware has any)."""
    return config.router.kv_aware.model_dump() if config.router.policy == "kv_aware" else {}


def _longer(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per worker, the longer of two prefix matches."""
    return {w: max(a.get(w, 0), b.get(w, 0)) for w in a.keys() | b.keys()}


__all__ = ["ChoiceEvent", "RequestResult", "RouterService", "SelfCheckError", "CapacityError", "NoWorkerError"]
