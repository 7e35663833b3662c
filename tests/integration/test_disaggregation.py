"""Disaggregated prefill/decode: real Ray actors, real UCX (over TCP / shared memory
here), the real SmolLM2; plus the same cluster in-process with the in-process transport."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from cluster.cluster import KVRelayCluster
from cluster.config import ClusterConfig
from cluster.kv_layout import WIRE_VERSION, LayoutMismatchError
from cluster.worker_api import WorkerAPI
from tests.integration.prompts import long_text
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = {"kv_cache_memory_gb": 0.25, "chunk_size": 256, "max_num_batched_tokens": 512}
FAST_DEADLINES = {"transfer_s": 20.0, "token_s": 30.0, "prefill_s": 60.0, "reserve_s": 10.0, "health_interval_s": 0.5}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def _config(**sections) -> ClusterConfig:
    data = {"engine": dict(ENGINE), "deadlines": dict(FAST_DEADLINES)}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return ClusterConfig.build(data)


class Running:
    """A cluster on its own event loop thread, so sync tests can drive it."""

    def __init__(self, cluster: KVRelayCluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        import threading

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(cluster.start(), timeout=300)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompt, params=GREEDY, request_id=None, timeout: float = 120) -> list[int]:
        async def go():
            toks = []
            async for out in self.cluster.generate(prompt, params, request_id):
                toks += out.new_token_ids
            return toks

        return self.run(go(), timeout)

    def generate_many(self, prompts, params=GREEDY, timeout: float = 300) -> list[list[int]]:
        async def one(p):
            toks = []
            async for out in self.cluster.generate(p, params):
                toks += out.new_token_ids
            return toks

        async def go():
            return await asyncio.gather(*(one(p) for p in prompts))

        return self.run(go(), timeout)

    def call(self, pool, index, method, *args):
        return self.run(pool.workers[index].handle.call(method, *args, timeout_s=30))

    def close(self):
        try:
            self.run(self.cluster.shutdown(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)




@pytest.fixture(scope="module")
def ucx_cluster(ray_runtime):
    c = Running(KVRelayCluster(_config(transfer={"transport": "ucx"}, admission={"queue_timeout_s": 180}), use_ray=True))
    yield c
    c.close()


@pytest.fixture(scope="module")
def inproc_cluster():
    c = Running(KVRelayCluster(_config(transfer={"transport": "inprocess"}), use_ray=False))
    yield c
    c.close()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    chat = lambda t: tokenizer.apply_chat_template([{"role": "user", "content": t}])  # noqa: E731
    return [
        chat("What is the capital of France?"),
        tokenizer.encode("The quick brown fox jumps over"),
        chat("Summarize:\n" + long_text(1500)),
        tokenizer.encode(long_text(700)),
        chat("Write a haiku about the sea."),
    ]


@pytest.fixture(scope="module")
def colocated_outputs(prompts):
    c = Running(KVRelayCluster(_config(pools={"colocated": True}), use_ray=False))
    try:
        return c.generate_many(prompts)
    finally:
        c.close()


def test_greedy_identical_colocated_inprocess_and_ucx(colocated_outputs, inproc_cluster, ucx_cluster, prompts):
    assert all(len(o) > 0 for o in colocated_outputs)
    assert inproc_cluster.generate_many(prompts) == colocated_outputs
    assert ucx_cluster.generate_many(prompts) == colocated_outputs
    stats = ucx_cluster.run(ucx_cluster.cluster.worker_stats())
    decode = next(s for s in stats if s["role"] == "decode")
    assert decode["kv_recomputes"] == 0 and decode["prefill_computed_tokens"] == 0  # D really received KV


def test_only_missing_pages_cross_the_wire(ucx_cluster, tokenizer):
    c = ucx_cluster
    layout = c.cluster.prefill.workers[0].layout
    per_block = layout.bytes_per_block_per_layer * layout.num_layers
    base = tokenizer.encode("Reference document:\n" + long_text(2000))
    first = base + tokenizer.encode("\nQuestion: who wrote it?")
    second = base + tokenizer.encode("\nQuestion: what is the main claim, briefly?")
    c.generate(first, request_id="dedup-1")
    r1 = c.call(c.cluster.prefill, 0, WorkerAPI.prefill_log, "dedup-1")
    assert r1.bytes_sent == r1.full_bytes == -(-len(first) // 16) * per_block
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    c.generate(second, request_id="dedup-2")
    r2 = c.call(c.cluster.prefill, 0, WorkerAPI.prefill_log, "dedup-2")
    missing_blocks = -(-len(second) // 16) - shared // 16  # D already holds the shared full blocks
    assert shared // 16 >= 20
    assert r2.bytes_sent == missing_blocks * per_block
    assert r2.full_bytes == -(-len(second) // 16) * per_block


def test_layers_arrive_while_later_layers_compute(ucx_cluster, tokenizer):
    c = ucx_cluster
    prompt = tokenizer.encode("Layerwise: " + long_text(3500))
    c.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0), request_id="layerwise")
    p = c.call(c.cluster.prefill, 0, WorkerAPI.prefill_log, "layerwise")
    received = c.call(c.cluster.decode, 0, WorkerAPI.transfer_log, "layerwise")
    last = max(p.layer_computed_at)
    assert len(received) == len(p.layer_computed_at) == last + 1
    # layer 0 was on the decode worker before the prefill worker finished its last layer
    assert received[0] < p.layer_computed_at[last]
    assert all(received[i] >= p.layer_computed_at[i] for i in received)


def test_mismatched_layout_is_refused_with_a_clear_message(inproc_cluster, tokenizer):
    c = inproc_cluster
    d = c.cluster.decode.workers[0]
    p = c.cluster.prefill.workers[0]
    wrong = dataclasses.replace(p.layout, dtype="bfloat16", block_size=32)
    with pytest.raises(LayoutMismatchError, match=r"dtype: 'float32' vs 'bfloat16'.*block_size: 16 vs 32"):
        c.run(d.handle.call(WorkerAPI.reserve, "mm-1", tokenizer.encode("hello"), GREEDY, wrong, timeout_s=10))
    desc = c.run(d.handle.call(WorkerAPI.reserve, "mm-2", tokenizer.encode("hello"), GREEDY, p.layout, timeout_s=10))
    bad_desc = dataclasses.replace(desc, layout=dataclasses.replace(desc.layout, num_kv_heads=8, wire_version=99))
    with pytest.raises(LayoutMismatchError, match=rf"num_kv_heads: 3 vs 8.*wire_version: {WIRE_VERSION} vs 99"):
        c.run(p.handle.call(WorkerAPI.prefill, "mm-2", tokenizer.encode("hello"), GREEDY, bad_desc, timeout_s=10))
    c.run(d.handle.call(WorkerAPI.abort, "mm-2", timeout_s=10))
    assert c.generate(tokenizer.encode("Still serving?"))  # nothing broke


def test_abort_frees_blocks_on_both_workers(inproc_cluster, tokenizer):
    c = inproc_cluster

    async def go():
        n = 0
        gen = c.cluster.generate(tokenizer.encode(long_text(600)), SamplingParams(max_tokens=300, ignore_eos=True))
        async for out in gen:
            n += len(out.new_token_ids)
            if n >= 3:
                break
        await gen.aclose()
        return n

    assert c.run(go()) >= 3
    for pool in (c.cluster.prefill, c.cluster.decode):
        deadline = time.monotonic() + 10  # the abort travels asynchronously
        h = c.call(pool, 0, WorkerAPI.health)
        while (h.running, h.waiting, h.kv_usage) != (0, 0, 0.0) and time.monotonic() < deadline:
            time.sleep(0.1)
            h = c.call(pool, 0, WorkerAPI.health)
        assert (h.running, h.waiting, h.kv_usage) == (0, 0, 0.0), (pool.role, h)


@pytest.mark.parametrize("mode", ["drop", "fail"])
def test_broken_transfer_is_recomputed_on_decode(tokenizer, colocated_outputs, prompts, mode):
    cfg = _config(transfer={"transport": "inprocess"}, deadlines={"transfer_s": 2.0})
    cluster = KVRelayCluster(cfg, use_ray=False)
    cluster.prefill.specs = [dataclasses.replace(s, transport_faults={"mode": mode}) for s in cluster.prefill.specs]
    c = Running(cluster)
    try:
        t0 = time.monotonic()
        assert c.generate(prompts[0]) == colocated_outputs[0]
        assert time.monotonic() - t0 < 30
        d = c.call(cluster.decode, 0, WorkerAPI.stats)
        assert d["kv_recomputes"] == 1
        assert d["transfer_failures"] == {"timeout": 1}
    finally:
        c.close()


def test_kv_waits_for_a_prefill_that_queued_past_the_transfer_deadline(colocated_outputs, prompts):
    """The decode worker posts its receives at reservation, before the prefill runs. A
    prefill that starts later than ``transfer_s`` after that (queued behind other prompts
    on its worker) still hands its KV over: no recompute on the decode worker."""
    cfg = _config(transfer={"transport": "inprocess"}, deadlines={"transfer_s": 1.0})
    cluster = KVRelayCluster(cfg, use_ray=False)
    c = Running(cluster)
    try:
        worker = cluster.prefill.workers[0].handle.target
        prefill = worker.prefill

        async def queued_prefill(*args, **kwargs):
            await asyncio.sleep(2.5)  # behind other prompts, longer than the transfer deadline
            return await prefill(*args, **kwargs)

        worker.prefill = queued_prefill
        assert c.generate(prompts[0]) == colocated_outputs[0]
        d = c.call(cluster.decode, 0, WorkerAPI.stats)
        assert d["kv_recomputes"] == 0 and not d["transfer_failures"], d
    finally:
        c.close()


def test_prefill_worker_death_mid_request(ucx_cluster, tokenizer, ray_runtime):
    c = ucx_cluster
    prompt = tokenizer.encode("Long one: " + long_text(7000))

    async def go():
        toks = []
        async for out in c.cluster.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0), "p-dies"):
            toks += out.new_token_ids
        return toks

    fut = asyncio.run_coroutine_threadsafe(go(), c.loop)
    time.sleep(0.5)  # the prefill (a ~1,600-token prompt in 256-token chunks) is under way
    ray_runtime.kill(c.cluster.prefill.workers[0].handle.target, no_restart=False)
    toks = fut.result(120)
    assert len(toks) == 8  # completed: the decode worker recomputed the prompt
    assert c.cluster.counters.prefill_failures >= 1
    d = c.call(c.cluster.decode, 0, WorkerAPI.stats)
    assert d["kv_recomputes"] >= 1
    # the pool restarts the worker, and the next request goes through it again
    assert c.run(c.cluster.prefill.wait_up(0, 120), timeout=130)
    assert c.cluster.prefill.workers[0].restarts >= 1
    assert c.generate(tokenizer.encode("After the restart:"), request_id="after-p")
    assert c.call(c.cluster.prefill, 0, WorkerAPI.prefill_log, "after-p") is not None


def test_decode_worker_death_mid_stream_waits_for_its_restart_and_migrates(ucx_cluster, tokenizer, ray_runtime):
    """The only decode worker dies after tokens reached the caller: the request waits
    (admission queue, retries first) for Ray to restart it, then continues there from
    the tokens already sent: greedy, so identical to an undisturbed run."""
    c = ucx_cluster
    prompt = tokenizer.encode("Tell a long story:")
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    reference = c.generate(prompt, params)
    got: list[int] = []

    async def go():
        async for out in c.cluster.generate(prompt, params, "d-dies"):
            got.extend(out.new_token_ids)

    fut = asyncio.run_coroutine_threadsafe(go(), c.loop)
    deadline = time.monotonic() + 60
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) >= 5
    migrations = c.cluster.counters.migrations
    ray_runtime.kill(c.cluster.decode.workers[0].handle.target, no_restart=False)
    fut.result(240)  # bounded: admission.queue_timeout_s, then the token deadline
    assert got == reference
    assert c.cluster.counters.migrations == migrations + 1
    assert c.cluster.decode.workers[0].restarts >= 1
    assert len(c.generate(tokenizer.encode("Next request after the restart"))) > 0
