"""The router's residency index and placement against real workers (Ray actors, UCX,
SmolLM2): exactness under eviction and restart, and kv_aware vs round_robin on a
multi-turn workload measured from the workers' own counters."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.config import ClusterConfig
from cluster.worker_api import WorkerAPI
from router.placement import make_policy
from router.service import RequestResult, RouterService
from tests.integration.prompts import long_text
from tests.integration.test_disaggregation import Running
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class RouterRunning(Running):
    def __init__(self, service: RouterService) -> None:  # noqa: D107
        self.service = service
        super().__init__(service)

    def ask(self, prompt: list[int], max_tokens: int = 12) -> list[int]:
        async def go():
            toks = []
            async for ev in self.service.run(prompt, [SamplingParams(max_tokens=max_tokens, temperature=0.0)], [], RequestResult(len(prompt))):
                toks += ev.token_ids
            return toks

        return self.run(go(), 180)

    def close(self):
        try:
            self.run(self.service.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def router(ray_runtime):
    cfg = ClusterConfig.build({
        # ~56 blocks of 16 tokens per worker: KV capacity is the scarce resource, as in
        # production. Each prefill worker can hold about half of the conversations below,
        # so where a conversation's next turn lands decides whether its prefix is still there.
        "engine": {"kv_cache_memory_gb": 0.0385, "chunk_size": 256, "max_num_batched_tokens": 512},
        "pools": {"prefill_workers": 2, "decode_workers": 1},
        "deadlines": {"health_interval_s": 0.5, "transfer_s": 10.0},
        "router": {"event_poll_s": 0.05},
    })
    service = RouterService(cfg)
    service.shutdown = service.stop  # Running calls start() and shutdown()
    r = RouterRunning(service)
    yield r
    r.close()




def _computed(r: RouterRunning) -> dict[str, int]:
    """Prompt tokens each worker has computed, decode workers included (local prefills)."""
    stats = r.run(r.service.cluster.worker_stats())
    return {f"{s['role']}-{s['index']}": s["prefill_computed_tokens"] for s in stats}


def _multi_turn(r: RouterRunning, tok, tag: str) -> dict[str, int]:
    """5 conversations x 6 turns; each turn's prompt extends the last (answer included).
    (An odd count, so round-robin does not land each conversation on one worker by luck.)"""
    before = _computed(r)
    convs = [[{"role": "system", "content": f"[{tag} conversation {c}] " + long_text(300 + 20 * c)}] for c in range(5)]
    for turn in range(6):
        for c, msgs in enumerate(convs):
            msgs.append({"role": "user", "content": f"Turn {turn}: tell me more about point {turn + c}."})
            prompt = tok.apply_chat_template(msgs)
            answer = tok.decode(r.ask(prompt, max_tokens=8), skip_special_tokens=True)
            msgs.append({"role": "assistant", "content": answer})
        time.sleep(0.2)  # let the KV events of this turn reach the index
    after = _computed(r)
    return {w: after[w] - before.get(w, 0) for w in after}


def test_self_check_ran_and_index_is_exact(router):
    s = router.service
    assert s.ready and s.indexes["prefill"].mode == "exact" and s.indexes["decode"].mode == "exact"
    assert s.indexes["prefill"].num_blocks > 0  # the probe's blocks


def test_kv_aware_computes_half_the_prefill_of_round_robin(router, tokenizer):
    s = router.service
    s.policy_name, s.policy = "round_robin", make_policy("round_robin")
    rr = _multi_turn(router, tokenizer, "rr")
    s.policy_name, s.policy = "kv_aware", make_policy("kv_aware")
    kv = _multi_turn(router, tokenizer, "kv")
    for d in (rr, kv):  # both prefill workers used
        assert all(v > 0 for w, v in d.items() if w.startswith("prefill")), (rr, kv)
    assert sum(rr.values()) >= 2 * sum(kv.values()), (rr, kv)  # every worker's computed tokens


def test_local_prefill_runs_on_the_decode_worker_with_the_same_tokens(router, tokenizer):
    """A follow-up that extends a prompt with the answer the decode worker generated:
    the decode worker holds one block more than the prefill worker, so kv_aware has it
    prefill the rest itself (prefill None). It computes only that rest, and greedy
    decoding gives the tokens a remote prefill of the same prompt gives."""
    s = router.service
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def ask(prompt):
        async def go():
            result, toks = RequestResult(len(prompt)), []
            async for ev in s.run(prompt, [greedy], [], result):
                toks += ev.token_ids
            return result, toks
        return router.run(go(), 180)

    # this fixture's decode pool is small (56 blocks): the KV-usage bound is lifted here
    s.policy_name, s.policy = "kv_aware", make_policy("kv_aware", local_prefill_max_tokens=256,
                                                      local_prefill_max_kv_usage=1.0)
    first = tokenizer.encode("[local prefill] " + long_text(700))
    _, answer = ask(first)
    follow = first + answer + tokenizer.encode(" Go on, briefly.")
    time.sleep(0.3)
    router.run(s.pump_events())
    before = _computed(router)
    local, local_tokens = ask(follow)
    after = _computed(router)
    assert local.placement.prefill is None and local.placement.decode == "decode-0"
    computed = {w: after[w] - before[w] for w in after}
    held = (len(first) + len(answer) - 1) // s.block_size * s.block_size  # the decode worker's full blocks
    assert computed["decode-0"] == len(follow) - held == len(follow) - local.cached_tokens
    assert all(v == 0 for w, v in computed.items() if w.startswith("prefill"))
    s.policy = make_policy("kv_aware", local_prefill_max_tokens=0)  # the same prompt, shipped from a prefill worker
    remote, remote_tokens = ask(follow)
    assert remote.placement.prefill is not None
    assert local_tokens == remote_tokens


def test_a_follow_up_goes_where_its_prefix_is_still_being_computed(router, tokenizer):
    """Two requests sharing a long prefix arrive together: when the second is placed,
    the first is still prefilling, so the index (which learns blocks once stored) knows
    nothing yet. The router's pending prefixes send it to the same prefill worker;
    without them it is cold and goes by load, i.e. to the other, idle worker."""
    s = router.service
    s.policy_name, s.policy = "kv_aware", make_policy("kv_aware")
    # Long enough that the prefix outweighs one request of load (256 tokens), short
    # enough that both fit the small decode pool at once (no dedup while in flight).
    shared = tokenizer.encode("[burst] " + long_text(1600))
    prompts = [shared + tokenizer.encode(f" Question {i}: what is point {i}?") for i in range(2)]
    assert 300 < len(shared) < 400
    assert not any(s.indexes["prefill"].match(s.hasher.hash_blocks(prompts[0]), touch=False).blocks.values())  # cold

    async def one(prompt):
        result = RequestResult(len(prompt))
        async for _ in s.run(prompt, [SamplingParams(max_tokens=2, temperature=0.0)], [], result):
            pass
        return result.placement.prefill

    async def burst():
        return await asyncio.gather(*(one(p) for p in prompts))

    workers = router.run(burst(), 180)
    assert workers[0] == workers[1], workers
    # every pending prefix is released once a drain begun after its first token is applied
    router.run(s.pump_events())
    router.run(s.pump_events())
    assert len(s.pending_prefixes) == 0


def test_index_matches_workers_after_eviction_and_restart(router, tokenizer, ray_runtime):
    s = router.service
    prompts = [tokenizer.encode(f"Eviction probe {i}: " + long_text(500)) for i in range(10)]
    for p in prompts:  # far more than one worker's pool: old blocks get evicted
        router.ask(p, max_tokens=2)
    time.sleep(0.5)
    router.run(s.pump_events())
    index = s.indexes["prefill"]
    checked = 0
    for w in s.cluster.prefill.workers:
        for p in prompts:
            hashes = s.hasher.hash_blocks(p)  # the deployment's keyed hashes
            truth = router.run(w.handle.call(WorkerAPI.cached_prefix_blocks, hashes, timeout_s=10))
            assert index.match(hashes, touch=False).num_blocks(w.handle.name) == truth
            checked += truth == 0
    assert checked > 0  # some prompts were evicted somewhere, and the index agrees

    # Restart prefill-0: its cache is empty afterwards, and so is its part of the index.
    victim = s.cluster.prefill.workers[0]
    before = len(index.blocks_of(victim.handle.name))
    assert before > 0
    ray_runtime.kill(victim.handle.target, no_restart=False)
    assert router.run(s.cluster.prefill.wait_up(0, 120), timeout=130)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        router.run(s.pump_events())
        if index.worker_mode(victim.handle.name) == "exact" and len(index.blocks_of(victim.handle.name)) == 0:
            break
        time.sleep(0.2)
    assert len(index.blocks_of(victim.handle.name)) == 0
    # new work on the restarted worker is indexed again
    s.policy_name, s.policy = "round_robin", make_policy("round_robin")
    for i in range(2):
        router.ask(tokenizer.encode(f"After restart {i}: " + long_text(300)), max_tokens=2)
    time.sleep(0.3)
    router.run(s.pump_events())
    assert len(index.blocks_of(victim.handle.name)) > 0


def test_tenants_do_not_share_cached_prefixes_through_the_api(router):
    """Prefix-cache isolation through the HTTP API (the FastAPI app over ASGI, on this
    real cluster; this server has no API key, so any bearer key is a tenant): tenant B
    sending tenant A's prompt gets no cached tokens, tenant A gets its own back, and so
    does a request naming A's cache_salt under any key. Placement still works inside a
    tenant: the router predicted the hit it got."""
    import httpx

    from router.api import app, install

    s = router.service
    s.policy_name, s.policy = "kv_aware", make_policy("kv_aware")
    install(s)
    messages = [{"role": "user", "content": "[isolation] " + long_text(1200) + " Summarize."}]

    async def ask(key: str | None, salt: str | None = None) -> int:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        body = {"model": s.model_id, "messages": messages, "max_tokens": 2, "temperature": 0,
                **({"cache_salt": salt} if salt else {})}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvrelay", timeout=120) as c:
            r = await c.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.3)  # the KV events of this request reach the index
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    def predicted() -> float:
        return s.metrics.predicted_hit_tokens._value.get()

    assert router.run(ask("sk-tenant-a")) == 0  # cold
    before = predicted()
    hit_a = router.run(ask("sk-tenant-a"))  # the same tenant: its own prefix
    assert hit_a >= 128, hit_a
    assert predicted() - before >= hit_a  # the index, keyed alike, saw it coming
    before = predicted()
    assert router.run(ask("sk-tenant-b")) == 0  # another key: nothing of A's
    assert predicted() == before  # and the router did not expect any
    assert router.run(ask("sk-tenant-b")) >= 128  # B's own prefix
    # No key: the shared default namespace, where the router's self-check probe went.
    # It may hit the probe's blocks (the chat template's opening), never A's or B's.
    from router.service import PROBE_TEXT

    probe = s.tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}])
    ours = s.tokenizer.apply_chat_template(messages)
    shared = next(i for i, (x, y) in enumerate(zip(probe, ours)) if x != y) // s.block_size * s.block_size
    assert shared < 64
    assert router.run(ask(None)) <= shared
    # cache_salt: its own namespace whatever the key; the same salt shares it.
    assert router.run(ask("sk-tenant-a", salt="team-x")) == 0
    assert router.run(ask("sk-tenant-b", salt="team-x")) >= 128
    # A 400 in OpenAI's envelope for a bad salt.
    async def bad() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvrelay", timeout=30) as c:
            return await c.post("/v1/completions", json={"model": s.model_id, "prompt": "hi", "cache_salt": ""})
    r = router.run(bad())
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
    # No hash hit was refused for holding other tokens: isolation came from the keys.
    stats = router.run(s.cluster.worker_stats())
    assert sum(st["prefix_cache_hash_mismatches"] for st in stats) == 0
