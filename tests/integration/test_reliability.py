"""Back-pressure and migration through the router (RouterService: the router's policy,
admission queue, retry rules) on real Ray actors, real UCX and the real SmolLM2:
1 prefill + 2 decode workers whose KV pools are deliberately small."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest
from prometheus_client import generate_latest

from cluster.admission import AdmissionRejected
from cluster.config import ClusterConfig
from cluster.worker_api import WorkerAPI
from router.service import RequestResult, RouterService
from tests.integration.prompts import long_text
from tests.integration.test_router_placement import RouterRunning
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# ~40 KV blocks of 16 tokens per worker (SmolLM2 float32: 720 KiB a block): one long
# prompt below needs more than half, so a decode worker holds one at a time.
KV_GB = 0.0275
LONG_PROMPT_CHARS = 1700


@pytest.fixture(scope="module")
def router(ray_runtime):
    cfg = ClusterConfig.build({
        "engine": {"kv_cache_memory_gb": KV_GB, "chunk_size": 256, "max_num_batched_tokens": 512},
        "pools": {"prefill_workers": 1, "decode_workers": 2},
        "deadlines": {"health_interval_s": 0.5, "transfer_s": 20.0, "token_s": 30.0, "reserve_s": 10.0},
        "admission": {"max_queued": 32, "queue_timeout_s": 240},
    })
    service = RouterService(cfg)
    service.shutdown = service.stop  # Running calls start() and shutdown()
    r = RouterRunning(service)
    yield r
    r.close()


async def _collect(service: RouterService, prompt: list[int], params: SamplingParams, on_token=None) -> tuple[str, list[int]]:
    text, ids = [], []
    async for ev in service.run(prompt, [params], [], RequestResult(len(prompt))):
        text.append(ev.text)
        ids += ev.token_ids
        if on_token is not None:
            on_token(len(ids))
    return "".join(text), ids


def _idle(router: RouterRunning, timeout_s: float = 30.0) -> list:
    """Every decode worker's health once nothing runs there (or the last one seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        hs = [router.run(w.handle.call(WorkerAPI.health, timeout_s=10)) for w in router.service.cluster.decode.workers]
        if all((h.running, h.waiting, h.kv_usage) == (0, 0, 0.0) for h in hs) or time.monotonic() > deadline:
            return hs
        time.sleep(0.2)


def _metric(service: RouterService, line_prefix: str) -> float:
    text = generate_latest(service.metrics.registry).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


def test_back_pressure_queues_instead_of_503_and_drains(router, tokenizer):
    s = router.service
    q = s.cluster.admission
    prompts = [tokenizer.encode(f"Request {i} of the back-pressure test.\n" + long_text(LONG_PROMPT_CHARS)) for i in range(6)]
    total = router.run(s.cluster.decode.workers[0].handle.call(WorkerAPI.health, timeout_s=10)).total_blocks
    assert 2 * -(-len(prompts[0]) // 16) > total  # one long prompt at a time per decode worker
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    queued_before = q.queued_total

    async def all_at_once():
        return await asyncio.gather(*(_collect(s, p, params) for p in prompts))

    t0 = time.monotonic()
    outs = router.run(all_at_once(), timeout=600)
    elapsed = time.monotonic() - t0
    assert all(len(ids) == 6 for _, ids in outs)  # every request completed, none refused
    assert q.queued_total - queued_before >= 2  # 6 requests, 2 decode workers with room for 1 each
    assert q.depth == 0 and not q.rejected  # the queue drained; nobody waited past the deadline
    assert elapsed < q.timeout_s
    assert _metric(s, 'kvrelay_admission_wait_seconds_count{pool="decode"}') >= 2
    # what waited in the queue came out the same as alone (greedy)
    assert router.run(_collect(s, prompts[-1], params), timeout=120) == outs[-1]
    hs = _idle(router)
    assert all((h.running, h.waiting, h.kv_usage) == (0, 0, 0.0) for h in hs), hs


def test_full_queue_answers_at_once_and_says_so(router, tokenizer):
    s = router.service
    q = s.cluster.admission
    hold = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)  # prompt + 200 fits the pool
    prompts = [tokenizer.encode(f"Holder {i}.\n" + long_text(LONG_PROMPT_CHARS)) for i in range(3)]
    started = [0, 0]

    async def scenario():
        holders = [asyncio.ensure_future(_collect(s, prompts[i], hold, lambda n, i=i: started.__setitem__(i, n)))
                   for i in range(2)]
        deadline = time.monotonic() + 240
        while min(started) == 0 and time.monotonic() < deadline:  # both decode workers hold one
            await asyncio.sleep(0.1)
        q.max_waiting = 0  # no queue: a request with no room is refused at once
        t0 = time.monotonic()
        try:
            await _collect(s, prompts[2], SamplingParams(max_tokens=2, temperature=0.0))
        except AdmissionRejected as e:
            return e, time.monotonic() - t0, started[:]
        finally:
            q.max_waiting = 32
            for h in holders:
                h.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        return None, 0.0, started[:]

    rejected, took, seen = router.run(scenario(), timeout=400)
    assert min(seen) > 0
    assert isinstance(rejected, AdmissionRejected) and rejected.reason == "full"
    assert took < 5.0  # refused at once, with Retry-After (see tests/unit/test_admission.py)
    assert _metric(s, 'kvrelay_admission_rejections_total{pool="decode",reason="full"}') >= 1
    hs = _idle(router)
    assert all((h.running, h.waiting, h.kv_usage) == (0, 0, 0.0) for h in hs), hs


def test_overload_excess_gets_429_with_retry_after_and_admitted_complete(router):
    """The CI-sized overload (the 1,000-client run over real HTTP is bench/overload.py):
    300 clients at once through the HTTP app (httpx over ASGI, in this process) against
    router.max_inflight 64. Never more than 64 in flight; the excess gets 429 with
    Retry-After in OpenAI's envelope; every admitted request completes; no other status;
    the router's per-request bookkeeping returns to empty and it serves normally after."""
    import httpx

    from router.api import app, install

    s = router.service
    install(s)
    original = s.config
    s.config = original.model_copy(update={"router": original.router.model_copy(update={"max_inflight": 64})})
    peak = [0]

    async def burst():
        start = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kvrelay", timeout=120) as c:
            async def one(i: int) -> httpx.Response:
                await start.wait()
                return await c.post("/v1/completions", json={"model": s.model_id, "prompt": f"Client {i} says hello.",
                                                             "max_tokens": 1, "temperature": 0})

            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], s.inflight)
                    await asyncio.sleep(0.01)

            tasks = [asyncio.ensure_future(one(i)) for i in range(300)]
            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0.1)
            start.set()
            try:
                return await asyncio.gather(*tasks)
            finally:
                watcher.cancel()

    limited_before = _metric(s, 'kvrelay_requests_total{status="rate_limited"}')
    t0 = time.monotonic()
    try:
        responses = router.run(burst(), timeout=120)
    finally:
        s.config = original
    took = time.monotonic() - t0
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, codes
    assert codes[200] >= 64 and codes[429] >= 1, codes
    assert 0 < peak[0] <= 64
    for r in responses:
        if r.status_code == 429:
            err = r.json()["error"]
            assert int(r.headers["retry-after"]) >= 1 and err["code"] == "rate_limit_exceeded" and err["type"], r.text
        else:
            assert r.json()["usage"]["completion_tokens"] == 1
    assert _metric(s, 'kvrelay_requests_total{status="rate_limited"}') - limited_before == codes[429]
    assert took < 60, took
    # Nothing of the burst is left behind, and the next request is served normally.
    assert s.inflight == 0 and not s.inflight_by_key and not any(s._placed.values()) and not any(s._queued_tokens.values())
    assert s.cluster.admission.depth == 0
    async def normal() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvrelay", timeout=60) as c:
            return await c.post("/v1/completions", json={"model": s.model_id, "prompt": "And now?", "max_tokens": 4})
    assert router.run(normal()).status_code == 200
    hs = _idle(router)
    assert all((h.running, h.waiting, h.kv_usage) == (0, 0, 0.0) for h in hs), hs


def test_sigkill_decode_worker_migrates_greedy_streams_unchanged(router, tokenizer):
    s = router.service
    chat = lambda t: tokenizer.apply_chat_template([{"role": "user", "content": t}])  # noqa: E731
    prompts = [chat(t) for t in ("Tell me about rivers.", "Describe a mountain.", "Write about the sea.",
                                 "Explain how bread is made.")]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def run_all(progress=None):
        cb = (lambda i: (lambda n: progress.__setitem__(i, n))) if progress is not None else (lambda i: None)
        return await asyncio.gather(*(_collect(s, p, params, cb(i)) for i, p in enumerate(prompts)))

    reference = router.run(run_all(), timeout=300)
    migrations_before = s.cluster.counters.migrations
    progress = [0] * len(prompts)
    fut = asyncio.run_coroutine_threadsafe(run_all(progress), router.loop)
    deadline = time.monotonic() + 120
    while min(progress) < 4 and time.monotonic() < deadline:  # every stream has tokens at its client
        time.sleep(0.05)
    assert min(progress) >= 4
    victim = max(s.cluster.decode.workers, key=lambda w: s._placed.get(w.handle.name, 0))
    assert s._placed.get(victim.handle.name, 0) > 0  # some of the streams run there
    os.kill(victim.health.pid, signal.SIGKILL)
    t0 = time.monotonic()
    got = fut.result(300)
    assert time.monotonic() - t0 < 120
    assert [text for text, _ in got] == [text for text, _ in reference]  # no gap, no repeat, no error
    assert [ids for _, ids in got] == [ids for _, ids in reference]
    assert s.cluster.counters.migrations > migrations_before
    assert _metric(s, "kvrelay_request_migrations_total") == s.cluster.counters.migrations
    # the killed worker comes back (Ray restarts it) and serves again
    assert router.run(s.cluster.decode.wait_up(victim.handle.index, 180), timeout=190)
    assert victim.restarts >= 1


def test_a_request_sent_while_the_only_prefill_worker_restarts_waits_and_completes(router, tokenizer):
    """SIGKILL the only prefill worker; once the pool sees it down, a fresh request has
    no prefill worker to be placed on. It waits in the admission queue (Ray is
    restarting the worker) instead of a 503, and completes as an undisturbed run."""
    s = router.service
    q = s.cluster.admission
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reference = router.run(_collect(s, prompt, params), timeout=300)
    victim = s.cluster.prefill.workers[0]
    restarts, queued, rejected = victim.restarts, q.queued_total, sum(q.rejected.values())
    prefill_waits = _metric(s, 'kvrelay_admission_wait_seconds_count{pool="prefill"}')
    decode_waits = _metric(s, 'kvrelay_admission_wait_seconds_count{pool="decode"}')
    os.kill(victim.health.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while victim.up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not victim.up and not s.cluster.prefill.healthy()  # nobody to place a prefill on
    t0 = time.monotonic()
    got = router.run(_collect(s, prompt, params), timeout=300)
    waited = time.monotonic() - t0
    assert got == reference
    assert q.queued_total == queued + 1 and sum(q.rejected.values()) == rejected  # it waited, was not refused
    assert victim.up and victim.restarts == restarts + 1  # it ran on the restarted worker
    assert waited < q.timeout_s
    # its wait is counted against the pool it waited on
    assert _metric(s, 'kvrelay_admission_wait_seconds_count{pool="prefill"}') == prefill_waits + 1
    assert _metric(s, 'kvrelay_admission_wait_seconds_count{pool="decode"}') == decode_waits
