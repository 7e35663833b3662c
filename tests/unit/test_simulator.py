"""The scale simulator (bench/simulator.py) on tiny configurations: it runs every
policy, no policy beats the one-cache ceiling, a seed fixes the result, and two router
replicas' indexes both equal what the simulated workers hold."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from bench.simulator import POLICIES, Chat, Simulation, TimingModel, _ChatGen, ceiling_hits, mooncake, simulate

TINY_CHAT = Chat(conversations_per_worker=3, system_prompts=3, max_turns=4, think_s=1.0)
# small caches, so evictions (BlockRemoved) happen within a few hundred requests
SMALL = replace(TimingModel(), capacity_tokens=40_000)


@pytest.mark.parametrize("workload", ["mooncake", "chat"])
def test_every_policy_runs_and_the_ceiling_bounds_it(workload):
    results = {p: simulate(workload, p, 4, timing=SMALL, limit=150, chat=TINY_CHAT) for p in POLICIES}
    ceilings = {r.ceiling_hit_tokens for r in results.values()}
    for r in results.values():
        assert r.requests > 0 and r.computed_tokens + r.hit_tokens == r.prompt_tokens
        assert 0 <= r.hit_tokens <= r.ceiling_hit_tokens, r
        assert r.ttft_p50_s > 0 and r.decision_p99_ms >= r.decision_p50_ms >= 0
    if workload == "mooncake":  # same arrivals for every policy: one ceiling
        assert len(ceilings) == 1


def test_same_seed_same_result():
    def run(seed):
        r = asdict(simulate("chat", "kv_aware", 4, timing=SMALL, chat=TINY_CHAT, seed=seed))
        return {k: v for k, v in r.items() if k not in ("decision_p50_ms", "decision_p99_ms", "sim_wall_s")}

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_ceiling_counts_leading_blocks_seen_before():
    reqs, bt = mooncake(4, TimingModel(), 0.5, limit=40)
    # by hand: a request hits its leading blocks some earlier request carried
    seen, expected = set(), 0
    for r in sorted(reqs, key=lambda r: (r.arrival, r.rid)):
        k = next((i for i, h in enumerate(r.hashes) if h not in seen), len(r.hashes))
        expected += min(k * bt, r.prompt_tokens)
        seen |= set(r.hashes)
    assert ceiling_hits(reqs, bt) == expected > 0


def test_two_replicas_indexes_equal_the_workers_caches():
    """Each replica's indexes are fed by the same events; after the last poll both
    equal every simulated worker's cache exactly (evictions included)."""
    tiny = replace(SMALL, capacity_tokens=4_000)  # 62 blocks a worker: evicts constantly
    gen = _ChatGen(TINY_CHAT, 4, tiny, 0.7, seed=1)
    sim = Simulation("kv_aware", 4, tiny, TINY_CHAT.block_tokens, replicas=2)
    sim.run(gen.first_turns(), lambda r, now: gen.turn(r.conv, r.turn + 1, now + 0.5))
    sim._poll()
    assert {r.replica for r in sim.done} == {0, 1}
    for rep in sim.replicas:
        for name, w in sim.prefill.items():
            assert rep.pindex.blocks_of(name) == frozenset(w.cache.lru)
        for name, d in sim.decode.items():
            assert rep.dindex.blocks_of(name) == frozenset(d.cache.lru)
        assert rep.pindex.mode == rep.dindex.mode == "exact"
    assert sum(w.cache.evicted for w in sim.prefill.values()) > 0  # the caches did evict
