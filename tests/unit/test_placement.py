"""Unit tests for router/placement.py: exact choices (and costs) of each policy over
tables of worker snapshots."""

from __future__ import annotations

import logging

import pytest

from router.placement import (
    POLICIES,
    KVAwarePolicy,
    NoWorkerError,
    Placement,
    PlacementRequest,
    WorkerSnapshot,
    make_policy,
)

BS = 16


def W(name: str, running: int = 0, waiting: int = 0, free: int = 100, total: int = 100, up: bool = True):
    return WorkerSnapshot(name, running, waiting, free, total, up)


def req(tokens: int = 160, prefill: dict | None = None, decode: dict | None = None) -> PlacementRequest:
    return PlacementRequest(tokens, BS, prefill or {}, decode or {})


DEC = [W("d0")]  # a decode pool for prefill-only cases


# ---- kv_aware: prefill -------------------------------------------------------------


@pytest.mark.parametrize(
    "case, request_, prefill, expected, costs",
    [
        (
            "long prefix wins at equal load",
            req(160, {"p0": 8}),
            [W("p0", running=1), W("p1", running=1)],
            "p0",
            {"p0": 32 + 256, "p1": 160 + 256},
        ),
        (
            "a short prefix does not outweigh one more queued request",
            req(160, {"p0": 2}),
            [W("p0", running=1, waiting=1), W("p1", running=1)],
            "p1",
            {"p0": 128 + 512, "p1": 160 + 256},
        ),
        (
            "a long prefix outweighs three queued requests",
            req(2000, {"p0": 100}),
            [W("p0", running=1, waiting=2), W("p1")],
            "p0",
            {"p0": 400 + 768, "p1": 2000},
        ),
        (
            "balance bound: the prefix holder is 9 requests over the least loaded",
            req(8000, {"p0": 500}),
            [W("p0", running=2, waiting=7), W("p1")],
            "p1",
            {"p1": 8000},  # p0 (cost 2304) is not a candidate
        ),
        (
            "at the bound (8 over) it is still a candidate",
            req(8000, {"p0": 500}),
            [W("p0", running=2, waiting=6), W("p1")],
            "p0",
            {"p0": 2048, "p1": 8000},
        ),
        (
            "bound is relative to the least loaded candidate",
            req(8000, {"p0": 500}),
            [W("p0", running=9), W("p1", running=5), W("p2", running=3)],
            "p0",
            {"p0": 2304, "p1": 8000 + 1280, "p2": 8000 + 768},
        ),
        (
            "a match longer than the prompt's full blocks counts as the whole prompt",
            req(40, {"p0": 9}),
            [W("p0"), W("p1")],
            "p0",
            {"p0": 0, "p1": 40},
        ),
        (
            "tie on cost: lower load wins",  # p0: 16 + 512 = 528 ; p1: 272 + 256 = 528
            req(272, {"p0": 16}),
            [W("p0", running=2), W("p1", running=1)],
            "p1",
            {"p0": 528, "p1": 528},
        ),
        (
            "tie on cost and load: more free blocks, then name",
            req(160),
            [W("p2", free=50), W("p1", free=60), W("p0", free=50)],
            "p1",
            {"p0": 160, "p1": 160, "p2": 160},
        ),
        (
            "down workers are skipped even with the best prefix",
            req(160, {"p0": 10}),
            [W("p0", up=False), W("p1", running=3)],
            "p1",
            {"p1": 160 + 768},
        ),
    ],
)
def test_kv_aware_prefill(case, request_, prefill, expected, costs):
    placement = make_policy("kv_aware").choose(request_, prefill, DEC)
    assert placement.prefill == expected, case
    assert {k: v for k, v in placement.costs.items() if k.startswith("p")} == pytest.approx(costs)


def test_balance_slack_is_configurable():
    r, pool = req(8000, {"p0": 500}), [W("p0", running=9), W("p1")]
    assert make_policy("kv_aware").choose(r, pool, DEC).prefill == "p1"
    assert make_policy("kv_aware", balance_slack=16).choose(r, pool, DEC).prefill == "p0"
    # with no slack only the least loaded remain
    no_slack = make_policy("kv_aware", balance_slack=0)
    assert no_slack.choose(req(160, {"p0": 10}), [W("p0", running=1), W("p1")], DEC).prefill == "p1"


# ---- kv_aware: decode --------------------------------------------------------------

# prompt 160 tokens = 10 blocks; total 100 blocks each
# decode_cost = missing tokens + 256 * load + 1024 * (1 - (free - missing blocks) / total)


@pytest.mark.parametrize(
    "case, request_, decode, expected, costs",
    [
        (
            "more free KV wins at equal load",
            req(160),
            [W("d0", free=20), W("d1", free=90)],
            "d1",
            {"d0": 160 + 1024 * 0.9, "d1": 160 + 1024 * 0.2},
        ),
        (
            "the held prefix wins at equal load and free KV (fewer blocks to ship)",
            req(160, decode={"d0": 8}),
            [W("d0", running=1, free=50), W("d1", running=1, free=50)],
            "d0",
            {"d0": 32 + 256 + 1024 * 0.52, "d1": 160 + 256 + 1024 * 0.6},
        ),
        (
            "load outweighs a little more free KV",
            req(160),
            [W("d0", running=2, free=90), W("d1", free=60)],
            "d1",
            {"d0": 160 + 512 + 1024 * 0.2, "d1": 160 + 1024 * 0.5},
        ),
        (
            "a worker without room for the prompt is not a candidate",
            req(160),
            [W("d0", free=9), W("d1", running=3, free=50)],
            "d1",
            {"d1": 160 + 768 + 1024 * 0.6},
        ),
        (
            "room counts the blocks it already holds",
            req(160, decode={"d0": 8}),
            [W("d0", free=2), W("d1", running=3, free=50)],
            "d0",
            {"d0": 32 + 1024 * 1.0, "d1": 160 + 768 + 1024 * 0.6},
        ),
        (
            "nobody has room: the most free blocks",
            req(160),
            [W("d0", free=3), W("d1", running=5, free=7), W("d2", free=7, running=6)],
            "d1",
            {"d1": 160 + 1280 + 1024 * 1.03},
        ),
        (
            "balance bound applies to decode too",
            req(8000, decode={"d0": 500}),
            [W("d0", running=9, free=900, total=1000), W("d1", free=900, total=1000)],
            "d1",
            {"d1": 8000 + 1024 * 0.6},
        ),
        (
            "down workers are skipped",
            req(160, decode={"d0": 10}),
            [W("d0", up=False), W("d1", running=1, free=20)],
            "d1",
            {"d1": 160 + 256 + 1024 * 0.9},
        ),
    ],
)
def test_kv_aware_decode(case, request_, decode, expected, costs):
    placement = make_policy("kv_aware").choose(request_, [W("p0")], decode)
    assert placement.decode == expected, case
    assert {k: v for k, v in placement.costs.items() if k.startswith("d")} == pytest.approx(costs)


def test_kv_aware_full_placement():
    r = req(160, prefill={"p1": 10, "p0": 4}, decode={"d0": 10})
    got = make_policy().choose(r, [W("p0"), W("p1")], [W("d0", free=50), W("d1", free=50)])
    assert got == Placement("p1", "d0", pytest.approx({"p0": 96, "p1": 0, "d0": 512, "d1": 160 + 614.4}))


def test_kv_aware_colocated_uses_the_colocated_match():
    # prefill_match is the (absent) prefill pool's: ignored
    r = req(160, prefill={"c0": 10}, decode={"c1": 10})
    got = make_policy("kv_aware").choose(r, [], [W("c0"), W("c1")])
    assert got.prefill is None and got.decode == "c1"
    assert got.costs == pytest.approx({"c0": 160 + 1024 * 0.1, "c1": 0})


def test_kv_aware_logs_cost_per_candidate(caplog):
    caplog.set_level(logging.DEBUG, logger="router.placement")
    pool = [W("p0", running=9), W("p1")]
    make_policy("kv_aware").choose(req(8000, {"p0": 500}), pool, [W("d0", free=900, total=1000)])
    text = caplog.text
    assert "prefill p0: load 9 over balance bound 8, skipped" in text
    assert "prefill (cold) p1: cost 8000.0 (running 0, waiting 0, free 100/100)" in text
    assert "decode d0: cost" in text


@pytest.mark.parametrize(
    "options",
    [
        {"load_weight": float("inf")},
        {"balance_slack": -1},
        {"kv_usage_weight": float("nan")},
        {"decode_load_weight": -0.5},
    ],
)
def test_kv_aware_rejects_bad_weights(options):
    with pytest.raises(ValueError):
        KVAwarePolicy(**options)


# ---- least_loaded ------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, expected",
    [
        ([W("a", running=2), W("b", running=1), W("c", running=3)], "b"),
        ([W("a", running=1, waiting=2), W("b", running=2)], "b"),  # running + waiting
        ([W("a", running=1, free=10), W("b", waiting=1, free=20)], "b"),  # tie: most free
        ([W("b", running=1), W("a", running=1)], "a"),  # tie: name
        ([W("a", up=False), W("b", running=7)], "b"),  # down skipped
    ],
)
def test_least_loaded(workers, expected):
    # the prefix match does not matter to it
    r = req(160, {"a": 10}, {"a": 10})
    got = make_policy("least_loaded").choose(r, workers, workers)
    assert (got.prefill, got.decode) == (expected, expected)
    assert got.costs == {w.name: float(w.load) for w in workers if w.up}


# ---- round_robin -------------------------------------------------------------------


def test_round_robin_cycles_each_pool_independently():
    rr = make_policy("round_robin")
    prefill = [W("p1"), W("p0"), W("p2")]
    decode = [W("d0"), W("d1")]
    got = [(pl.prefill, pl.decode) for pl in (rr.choose(req(), prefill, decode) for _ in range(5))]
    assert got == [("p0", "d0"), ("p1", "d1"), ("p2", "d0"), ("p0", "d1"), ("p1", "d0")]
    # p2 goes down: the cycle continues past it without reshuffling the others
    prefill[2] = W("p2", up=False)
    got = [rr.choose(req(), prefill, decode).prefill for _ in range(3)]
    assert got == ["p0", "p1", "p0"]
    assert rr.choose(req(), prefill, decode).costs == {}


def test_round_robin_colocated_pool_has_its_own_position():
    rr = make_policy("round_robin")
    assert rr.choose(req(), [W("p0")], [W("d0"), W("d1")]).decode == "d0"
    got = [rr.choose(req(), [], [W("d0"), W("d1")]) for _ in range(3)]
    assert [(g.prefill, g.decode) for g in got] == [(None, "d0"), (None, "d1"), (None, "d0")]


def test_policies_are_independent_instances():
    a, b = make_policy("round_robin"), make_policy("round_robin")
    assert a.choose(req(), [W("p0"), W("p1")], DEC).prefill == "p0"
    assert b.choose(req(), [W("p0"), W("p1")], DEC).prefill == "p0"


# ---- no workers, registry, validation ---------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize(
    "prefill, decode, message",
    [
        ([W("p0", up=False), W("p1", up=False)], [W("d0")], "no prefill worker is up (2 known, all down)"),
        ([W("p0")], [W("d0", up=False)], "no decode worker is up (1 known, all down)"),
        ([W("p0")], [], "no decode worker is up (none known)"),
        ([], [], "no colocated worker is up (none known)"),
    ],
)
def test_no_worker_up(name, prefill, decode, message):
    with pytest.raises(NoWorkerError) as e:
        make_policy(name).choose(req(), prefill, decode)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)


def test_registry():
    assert sorted(POLICIES) == ["kv_aware", "least_loaded", "round_robin"]
    assert make_policy().name == "kv_aware"
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError) as e:
        make_policy("random")
    assert str(e.value) == "unknown placement policy 'random'; choose one of: kv_aware, least_loaded, round_robin"
    with pytest.raises(TypeError):
        make_policy("round_robin", load_weight=1.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PlacementRequest(160, 0),
        lambda: PlacementRequest(-1, 16),
        lambda: WorkerSnapshot("w", -1, 0, 10, 10),
        lambda: WorkerSnapshot("w", 0, 0, 10, 0),
    ],
)
def test_inputs_validated(build):
    with pytest.raises(ValueError):
        build()


def test_request_block_arithmetic():
    r = req(161, {"a": 3}, {"a": 3})
    assert r.num_prompt_blocks == 11
    assert r.uncached_tokens(r.prefill_match, "a") == 161 - 48
    assert r.missing_blocks(r.decode_match, "a") == 8
    assert r.missing_blocks(r.decode_match, "b") == 11


def test_kv_aware_spreads_cold_prompts_instead_of_chasing_a_shared_header():
    # Both workers hold only a 1-block shared header of 10-block prompts: below the
    # cache threshold, so the prompts are new work and alternate over the idle pool.
    policy = make_policy("kv_aware")
    pool = [W("p0"), W("p1")]
    chosen = [policy.choose(req(160, {"p0": 1}), pool, [W("d0")]).prefill for _ in range(4)]
    assert sorted(chosen) == ["p0", "p0", "p1", "p1"]
    # a real prefix (over half the prompt) still wins, every time
    assert {policy.choose(req(160, {"p1": 6}), pool, [W("d0")]).prefill for _ in range(4)} == {"p1"}
