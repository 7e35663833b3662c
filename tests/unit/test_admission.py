"""Admission queue (cluster/admission.py), the retry rules (cluster/retry.py), their
configuration and the API's answer to a refusal; the real cluster under back-pressure
is tests/integration/test_reliability.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.admission import AdmissionQueue, AdmissionRejected
from cluster.config import ClusterConfig, ConfigError
from cluster.retry import Step, next_step
from cluster.worker_api import CapacityError, WorkerDiedError


class Slots:
    """A pool with ``n`` reservations; ``try_take`` raises CapacityError when full."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.order: list[str] = []

    def taker(self, name: str):
        async def take():
            await asyncio.sleep(0)
            if self.free == 0:
                raise CapacityError("full")
            self.free -= 1
            self.order.append(name)
            return name
        return take


def test_fifo_with_retries_first_and_everyone_admitted():
    async def go():
        slots = Slots(1)
        q = AdmissionQueue("decode", max_waiting=10, timeout_s=5, retry_after_s=1)
        waits = []
        q.on_wait = lambda pool, s: waits.append((pool, s))
        assert await q.admit(slots.taker("first")) == "first"  # room: no wait
        tasks = [asyncio.create_task(q.admit(slots.taker(f"fresh{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(q.admit(slots.taker("retry"), retry=True)))
        await asyncio.sleep(0.05)
        assert q.depth == 4
        for _ in range(4):  # free one slot at a time
            slots.free += 1
            q.wake()
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*tasks) == ["fresh0", "fresh1", "fresh2", "retry"]
        return slots.order, q.depth, waits

    order, depth, waits = asyncio.run(go())
    assert order == ["first", "retry", "fresh0", "fresh1", "fresh2"]  # retry jumped the fresh ones
    assert depth == 0 and len(waits) == 4 and all(p == "decode" for p, _ in waits)


def test_full_queue_and_deadline_are_refused_with_their_reason():
    async def go():
        slots = Slots(0)
        q = AdmissionQueue("decode", max_waiting=1, timeout_s=0.5, retry_after_s=3)
        waiting = asyncio.create_task(q.admit(slots.taker("a")))
        await asyncio.sleep(0.05)
        with pytest.raises(AdmissionRejected) as full:
            await q.admit(slots.taker("b"))
        t0 = time.monotonic()
        with pytest.raises(AdmissionRejected) as late:
            await waiting
        return full.value, late.value, time.monotonic() - t0, q

    full, late, waited, q = asyncio.run(go())
    assert (full.reason, full.retry_after_s) == ("full", 3)
    assert late.reason == "timeout" and waited < 1.0  # within its deadline, not a hang
    assert dict(q.rejected) == {"full": 1, "timeout": 1} and q.depth == 0


def test_a_wait_is_counted_against_the_pool_it_last_waited_on():
    from cluster.admission import PoolUnavailable

    async def go():
        q = AdmissionQueue("decode", max_waiting=5, timeout_s=5, retry_after_s=1)
        waits = []
        q.on_wait = lambda pool, s: waits.append(pool)
        refusals = iter([PoolUnavailable("no prefill worker is up", "prefill"), PoolUnavailable("x", "prefill")])

        async def prefill_back_then_room():  # refused twice while the prefill pool is down
            e = next(refusals, None)
            if e is not None:
                raise e
            return "ok"

        refusals2 = iter([PoolUnavailable("no prefill worker is up", "prefill"), CapacityError("decode full")])

        async def prefill_back_then_decode_full():  # then the decode pool has no room for a while
            e = next(refusals2, None)
            if e is not None:
                raise e
            return "ok"

        assert await q.admit(prefill_back_then_room) == "ok"
        assert await q.admit(prefill_back_then_decode_full) == "ok"
        return waits

    assert asyncio.run(go()) == ["prefill", "decode"]


def test_a_cancelled_waiter_leaves_the_queue():
    async def go():
        q = AdmissionQueue("decode", max_waiting=5, timeout_s=5, retry_after_s=1)
        t = asyncio.create_task(q.admit(Slots(0).taker("x")))
        await asyncio.sleep(0.05)
        assert q.depth == 1
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        return q.depth

    assert asyncio.run(go()) == 0


@pytest.mark.parametrize("error, sent, attempts, step", [
    (WorkerDiedError("decode-0 died during decode"), 0, 1, Step.RETRY),
    (TimeoutError("decode-0.reserve did not answer"), 0, 1, Step.RETRY),
    (WorkerDiedError("decode-0 died during decode"), 5, 1, Step.MIGRATE),
    (TimeoutError("decode-0.decode sent nothing"), 5, 2, Step.MIGRATE),
    (WorkerDiedError("decode-0 died during decode"), 5, 3, Step.FAIL),  # max_attempts 3
    (ValueError("bad prompt"), 0, 1, Step.FAIL),
    (AdmissionRejected("full", "full", 1), 0, 1, Step.FAIL),
])
def test_retry_rules(error, sent, attempts, step):
    assert next_step(error, sent, attempts, max_attempts=3) is step


def test_limits_are_configurable_and_validated():
    cfg = ClusterConfig.build({"admission": {"max_queued": 8, "queue_timeout_s": 5},
                               "router": {"max_inflight_per_key": 4, "max_body_bytes": 65536, "max_n": 2}})
    assert (cfg.admission.max_queued, cfg.router.max_inflight_per_key, cfg.router.max_n) == (8, 4, 2)
    for bad, key in [({"admission": {"queue_timeout_s": 0}}, "admission.queue_timeout_s"),
                     ({"router": {"max_inflight_per_key": 0}}, "router.max_inflight_per_key"),
                     ({"router": {"max_n": 17}}, "router.max_n"),
                     ({"router": {"max_body_bytes": 10}}, "router.max_body_bytes")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ClusterConfig.build(bad)


def test_refusal_is_503_with_retry_after():
    from router.api import _as_api_error, _status

    err = _as_api_error(AdmissionRejected("the decode pool has no free KV and its queue is full", "full", 2.5))
    assert (err.status, err.headers, err.code) == (503, {"Retry-After": "3"}, "overloaded")
    assert err.error_body()["error"]["type"] == "server_error"
    assert _status(AdmissionRejected("x", "timeout", 1)) == "unavailable"


def _cluster_with_prefill_down(restarts: int, max_restarts: int = 3, queue_timeout_s: float = 5.0):
    """A cluster whose only prefill worker is down (restarted ``restarts`` times so far);
    its pools are never started: placement is all this looks at."""
    from types import SimpleNamespace

    from cluster.cluster import KVRelayCluster
    from cluster.pool import WorkerState

    cfg = ClusterConfig.build({"pools": {"max_restarts": max_restarts},
                               "admission": {"queue_timeout_s": queue_timeout_s}})
    c = KVRelayCluster(cfg, use_ray=True)  # use_ray: workers Ray may restart
    prefill = WorkerState(SimpleNamespace(name="prefill-0"), up=False, restarts=restarts)
    c.prefill.workers.append(prefill)
    c.decode.workers.append(WorkerState(SimpleNamespace(name="decode-0"), up=True))
    return c, prefill


class NoneUp(Exception):
    """What a placement policy raises when a pool has no worker up."""


def test_a_fresh_request_waits_for_a_restarting_prefill_worker():
    async def go():
        c, prefill = _cluster_with_prefill_down(restarts=0)
        calls = []

        def place():
            calls.append(time.monotonic())
            if not prefill.up:
                raise NoneUp("no prefill worker is up")
            return "placed"

        async def restart():
            await asyncio.sleep(0.6)
            prefill.up, prefill.restarts = True, 1  # the pool's probe saw it back
        assert c.restarting()
        t0 = time.monotonic()
        waits = []
        c.on_admission_wait = lambda pool, s: waits.append((pool, s))
        placed, _ = await asyncio.gather(c.wait_for_workers(place, NoneUp), restart())
        return placed, time.monotonic() - t0, len(calls), c.admission, waits

    placed, took, calls, q, waits = asyncio.run(go())
    assert placed == "placed" and 0.5 < took < 2.0
    assert calls > 2  # tried from the queue until the worker was up
    assert q.queued_total == 1 and q.depth == 0 and not q.rejected
    # the wait is counted against the pool it waited on, not the queue's decode pool
    assert [p for p, _ in waits] == ["prefill"] and waits[0][1] > 0.5


def test_no_wait_when_no_worker_can_come_back_and_a_bounded_wait_otherwise():
    def place():
        raise NoneUp("no prefill worker is up")

    async def spent():  # restarts used up: Ray will not bring it back
        c, _ = _cluster_with_prefill_down(restarts=3, max_restarts=3)
        assert not c.restarting()
        await c.wait_for_workers(place, NoneUp)

    with pytest.raises(NoneUp):
        asyncio.run(asyncio.wait_for(spent(), 1.0))

    async def never_back():  # may come back, but not within the queue's deadline
        c, _ = _cluster_with_prefill_down(restarts=0, queue_timeout_s=0.5)
        await c.wait_for_workers(place, NoneUp)

    with pytest.raises(AdmissionRejected) as e:
        asyncio.run(never_back())
    assert e.value.reason == "timeout" and "no prefill worker is up" in str(e.value)
