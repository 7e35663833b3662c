"""The router's placement bookkeeping without workers: the uncached tokens it places on
a prefill worker count as queued there until the first token, the bytes to ship follow
the compression preset, and the chosen cost's parts reach Prometheus. A fake cluster
stands in for the Ray pools (the real ones are in tests/integration)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import ClusterConfig
from cluster.kv_events import BlockStored
from cluster.pool import WorkerState
from router.service import RequestResult, RouterService
from workers.sampling_params import SamplingParams
from workers.worker import WorkerHealth


def _state(role: str, i: int, free: int = 1000) -> WorkerState:
    health = WorkerHealth(role, i, 1, 1.0, True, 0, 0, 0.0, free, 1000, 2048)
    return WorkerState(SimpleNamespace(name=f"{role}-{i}"), up=True, health=health)


class FakeCluster:
    """Two prefill workers and one decode worker; each request yields its first token
    when ``go`` is set, then finishes."""

    def __init__(self) -> None:
        self.states = {"prefill": [_state("prefill", 0), _state("prefill", 1)], "decode": [_state("decode", 0)]}
        self.go = asyncio.Event()

    def worker_states(self):
        return self.states

    async def generate(self, prompt, params, rid, placement, compression=None, placer=None):
        await self.go.wait()
        yield SimpleNamespace(new_token_ids=[42], new_logprobs=[], num_cached_tokens=0, finished=False, finish_reason=None, prompt_logprobs=None)
        yield SimpleNamespace(new_token_ids=[43], new_logprobs=[], num_cached_tokens=0, finished=True, finish_reason="length", prompt_logprobs=None)


@pytest.fixture(scope="module")
def service() -> RouterService:
    s = RouterService(ClusterConfig.build({"pools": {"prefill_workers": 2, "decode_workers": 1}}))
    return s


def test_queued_tokens_from_placement_to_first_token(service):
    async def go():
        service.cluster = cluster = FakeCluster()
        prompt = list(range(1000, 1000 + 320))  # 20 blocks
        hashes = service.hasher.hash_blocks(prompt)  # the router's keyed hashes
        service.indexes["prefill"].apply("prefill-1", [BlockStored(1, tuple(hashes[:12]), None)])
        result = RequestResult(len(prompt))
        events = []

        async def consume():
            async for ev in service.run(prompt, [SamplingParams(max_tokens=2)], [], result):
                events.append(ev)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        # placed where 12 of its 20 blocks are; the other 128 tokens are queued there
        assert result.placement.prefill == "prefill-1"
        assert service._queued_tokens == {"prefill-1": 320 - 192}
        snaps = {w.name: w.queued_tokens for w in service._snapshots("prefill")}
        assert snaps == {"prefill-0": 0, "prefill-1": 128}
        # a second, cold prompt now goes to the other worker: prefill-1 has work queued
        other = list(range(5000, 5000 + 320))
        assert service.place(other).prefill == "prefill-0"
        cluster.go.set()
        await task
        assert service._queued_tokens == {"prefill-1": 0}
        assert [e.token_ids for e in events][-1] == [43]

    asyncio.run(go())


def test_chosen_cost_parts_are_exported(service):
    service.cluster = FakeCluster()
    before = service.metrics.registry.get_sample_value(
        "kvrelay_router_placement_cost_count", {"policy": "kv_aware", "part": "prefill_uncached_tokens"}) or 0
    service.place(list(range(7000, 7000 + 64)))
    after = service.metrics.registry.get_sample_value(
        "kvrelay_router_placement_cost_count", {"policy": "kv_aware", "part": "prefill_uncached_tokens"})
    assert after == before + 1
    for part in ("prefill_queued_tokens", "decode_running", "decode_kv_usage", "decode_ship_mib", "decode_cost"):
        assert service.metrics.registry.get_sample_value(
            "kvrelay_router_placement_cost_count", {"policy": "kv_aware", "part": part}) >= 1


def test_shipped_bytes_follow_the_compression_preset(service):
    per_token = service.model_config.kv_bytes_per_token  # elements of K and V, all layers
    bs = service.block_size
    assert service._shipped_block_bytes(None) == per_token * bs * 4  # float32 on CPU, preset none
    assert service._shipped_block_bytes("int8") == per_token * bs * 1
    assert service._shipped_block_bytes("int4") == per_token * bs * 0.5
    assert service._shipped_block_bytes("balanced") == per_token * bs * 0.5 * 0.5  # keep 0.5, int4


def test_live_conversations_count_from_placement_to_a_think_time_after(service, monkeypatch):
    """A request's conversation is live on its compute worker while it runs and for
    router.live_prefix_window_s after; the next cold prompt goes to the other worker,
    and once the window has passed, nothing counts."""
    import router.service as svc

    async def go():
        service.cluster = cluster = FakeCluster()
        clock = [1000.0]
        monkeypatch.setattr(svc, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # the router's clock only
        service.live_prefixes = svc.LivePrefixes(10.0)
        prompt = list(range(7000, 7000 + 160))

        async def consume(p):
            async for _ in service.run(p, [SamplingParams(max_tokens=2)], [], RequestResult(len(p))):
                pass

        task = asyncio.create_task(consume(prompt))
        await asyncio.sleep(0.05)
        lives = {w.name: w.live_prefixes for w in service._snapshots("prefill")}
        first = next(n for n, c in lives.items() if c)
        assert lives == {first: 1, ({"prefill-0", "prefill-1"} - {first}).pop(): 0}
        cluster.go.set()
        await task
        clock[0] += 10.0  # answered; still live within the window
        assert {w.name: w.live_prefixes for w in service._snapshots("prefill")}[first] == 1
        assert service.place(list(range(9000, 9000 + 160))).prefill != first
        clock[0] += 0.5
        assert sum(w.live_prefixes for w in service._snapshots("prefill")) == 0

    asyncio.run(go())


class _EventHandle:
    """A worker handle whose KV-event drain returns what the test stored there, and
    waits while ``hold`` is set (a worker busy in a step: the drain lags). As with a
    Ray actor call, the caller's timeout does not stop the call on the worker: it
    still empties the queue when the step ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list = []
        self.hold: asyncio.Event | None = None

    async def _drain(self):
        if self.hold is not None:
            await self.hold.wait()
        out, self.events = self.events, []
        return out

    async def call(self, method, timeout_s: float):
        from cluster.worker_api import WorkerAPI

        assert method is WorkerAPI.kv_events, method
        return await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(self._drain())), timeout_s)


def test_a_follow_up_between_the_first_token_and_the_index_drain_goes_where_its_prefix_is(service):
    """The first token says the parent's blocks are stored; the index learns them at
    the next drain of that worker's events, which waits for its current step. A
    follow-up placed in between used to look cold (the pending prefix was released at
    the first token) and went to the other worker by the live-conversation balance;
    it now goes where its parent was computed, and the pending entry leaves only once
    a drain begun after the first token has been applied."""
    async def go():
        service.cluster = cluster = FakeCluster()
        handles = {}
        for states in cluster.states.values():
            for w in states:
                handles[w.handle.name] = w.handle = _EventHandle(w.handle.name)
        parent = list(range(20000, 20000 + 352))  # 22 blocks
        hashes = service.hasher.hash_blocks(parent)
        result = RequestResult(len(parent))

        async def consume(p, r):
            async for _ in service.run(p, [SamplingParams(max_tokens=2)], [], r):
                pass

        task = asyncio.create_task(consume(parent, result))
        await asyncio.sleep(0.05)
        where = result.placement.prefill
        handles[where].hold = hold = asyncio.Event()  # its worker is busy in a long step
        # a pump that starts now (before the first token) leaves that worker's drain running
        early = asyncio.create_task(service.pump_events())
        await asyncio.sleep(0.01)
        cluster.go.set()  # prefill done: blocks stored, first token back, request ends
        await task
        handles[where].events.append(BlockStored(1, tuple(hashes), None))
        follow_up = parent + list(range(30000, 30000 + 160))
        assert service.place(follow_up).prefill == where  # the index does not know it yet
        await early  # came back without that worker's drain, which is still running
        assert where in service._drains
        assert service.place(follow_up).prefill == where
        hold.set()
        await service.pump_events()  # the drain that began before the first token: applied,
        assert len(service.pending_prefixes) == 1  # but it may have run before the store
        assert service.indexes["prefill"].match(service.hasher.hash_blocks(follow_up), touch=False).blocks[where] == 22
        await service.pump_events()  # one begun after it: the entry goes
        assert len(service.pending_prefixes) == 0
        assert service.place(follow_up).prefill == where

    asyncio.run(go())


def test_a_slow_drain_is_waited_for_not_abandoned(service):
    """A worker busy in a step longer than a pump's wait: its drain stays in flight
    and its events are applied when they come back, in order, so the index never sees
    a gap (an abandoned call still empties the worker's queue, and the index then drops
    the worker until a snapshot comes back)."""
    from router.residency_index import WorkerMode

    async def go():
        service.cluster = cluster = FakeCluster()
        handles = {}
        for states in cluster.states.values():
            for w in states:
                handles[w.handle.name] = w.handle = _EventHandle(w.handle.name)
        service.indexes["prefill"].resync("prefill-0", _snapshot(0))
        a = service.hasher.hash_blocks(list(range(40000, 40000 + 64)))
        b = service.hasher.hash_blocks(list(range(50000, 50000 + 64)))
        handles["prefill-0"].hold = hold = asyncio.Event()
        handles["prefill-0"].events = [BlockStored(1, tuple(a), None)]
        await service.pump_events()  # prefill-0 is in a long step: nothing from it yet
        await service.pump_events()
        assert service.indexes["prefill"].match(a, touch=False).num_blocks("prefill-0") == 0
        hold.set()
        await service.pump_events()
        handles["prefill-0"].events = [BlockStored(2, tuple(b), None)]
        await service.pump_events()
        index = service.indexes["prefill"]
        assert index.worker_mode("prefill-0") is WorkerMode.EXACT
        assert index.match(a, touch=False).num_blocks("prefill-0") == 4
        assert index.match(b, touch=False).num_blocks("prefill-0") == 4

    asyncio.run(go())


def _snapshot(seq: int):
    from cluster.kv_events import KVSnapshot

    return KVSnapshot(seq, ())
