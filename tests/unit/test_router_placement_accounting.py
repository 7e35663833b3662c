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
    waits while ``hold`` is set (a worker busy in a step: the drain lags)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list = []
        self.hold: asyncio.Event | None = None

    async def call(self, method, timeout_s: float = 0.0):
        from cluster.worker_api import WorkerAPI

        assert method is WorkerAPI.kv_events, method
        if self.hold is not None:
            await self.hold.wait()
        out, self.events = self.events, []
        return out


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
        handles[where].hold = hold = asyncio.Event()  # its worker is busy in its next step
        # a drain that starts now (before the first token) waits on that worker
        early = asyncio.create_task(service.pump_events())
        await asyncio.sleep(0.01)
        cluster.go.set()  # prefill done: blocks stored, first token back, request ends
        await task
        handles[where].events.append(BlockStored(1, tuple(hashes), None))
        follow_up = parent + list(range(30000, 30000 + 160))
        assert service.place(follow_up).prefill == where  # the index does not know it yet
        hold.set()
        await early  # began before the first token: the entry stays (this drain may or
        assert len(service.pending_prefixes) == 1  # may not have run after the store; here it did)
        assert service.indexes["prefill"].match(service.hasher.hash_blocks(follow_up), touch=False).blocks[where] == 22
        await service.pump_events()  # began after: the index has the blocks, the entry goes
        assert len(service.pending_prefixes) == 0
        assert service.place(follow_up).prefill == where

    asyncio.run(go())
