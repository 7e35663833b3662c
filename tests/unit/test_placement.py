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


def W(name: str, running: int = 0, waiting: int = 0, free: int = 100, total: int = 100, up: bool = True,
      queued: int = 0):
    return WorkerSnapshot(name, running, waiting, free, total, up, queued_tokens=queued)


MiB = 2**20


def req(tokens: int = 160, prefill: dict | None = None, decode: dict | None = None, block_bytes: float = 0.0):
    return PlacementRequest(tokens, BS, prefill or {}, decode or {}, block_bytes)


DEC = [W("d0")]  # a decode pool for prefill-only cases


# ---- kv_aware: prefill -------------------------------------------------------------

# prefill(P) = uncached tokens + queue_weight (0.2) * queued tokens; prompt 160 = 10 blocks


@pytest.mark.parametrize(
    "case, request_, prefill, expected, costs",
    [
        ("long prefix wins at equal queues", req(160, {"p0": 8}), [W("p0"), W("p1")], "p0", {"p0": 32, "p1": 160}),
        (
            "queued work outweighs a short prefix",
            req(160, {"p0": 3}),
            [W("p0", queued=300), W("p1")],
            "p1",
            {"p0": 112 + 60, "p1": 160},
        ),
        (
            "a match under a quarter of the prompt (a shared header) is no prefix",
            req(160, {"p0": 2}),
            [W("p0", queued=10), W("p1")],
            "p1",
            {"p0": 160 + 2, "p1": 160},
        ),
        (
            "a quarter of the prompt is",
            req(256, {"p0": 4}),
            [W("p0", queued=10), W("p1")],
            "p0",
            {"p0": 192 + 2, "p1": 256},
        ),
        (
            "a long prefix is worth waiting behind less work than it saves",
            req(2000, {"p0": 100}),
            [W("p0", queued=1000), W("p1", queued=100)],
            "p0",
            {"p0": 400 + 200, "p1": 2000 + 20},
        ),
        (
            "but not behind more",
            req(2000, {"p0": 100}),
            [W("p0", queued=9000), W("p1")],
            "p1",
            {"p0": 400 + 1800, "p1": 2000},
        ),
        (
            "requests are not work: running and waiting counts do not weigh on prefill",
            req(160, {"p0": 8}),
            [W("p0", running=5, waiting=3), W("p1")],
            "p0",
            {"p0": 32, "p1": 160},
        ),
        (
            "a match longer than the prompt's full blocks counts as the whole prompt",
            req(40, {"p0": 9}),
            [W("p0"), W("p1")],
            "p0",
            {"p0": 0, "p1": 40},
        ),
        (
            "down workers are skipped even with the best prefix",
            req(160, {"p0": 10}),
            [W("p0", up=False), W("p1", queued=50)],
            "p1",
            {"p1": 160 + 10},
        ),
    ],
)
def test_kv_aware_prefill(case, request_, prefill, expected, costs):
    placement = make_policy("kv_aware").choose(request_, prefill, DEC)
    assert placement.prefill == expected, case
    assert {k: v for k, v in placement.costs.items() if k.startswith("p")} == pytest.approx(costs)


def test_queue_weight_is_configurable():
    r, pool = req(2000, {"p0": 100}), [W("p0", queued=9000), W("p1")]
    assert make_policy("kv_aware").choose(r, pool, DEC).prefill == "p1"
    got = make_policy("kv_aware", queue_weight=0.1).choose(r, pool, DEC)
    assert got.prefill == "p0" and got.costs["p0"] == pytest.approx(400 + 900)
    # at 1, a queued token weighs as much as one to compute: 1700 queued outweigh 1600 saved
    assert make_policy("kv_aware", queue_weight=1.0).choose(r, [W("p0", queued=1700), W("p1")], DEC).prefill == "p1"


# ---- kv_aware: decode --------------------------------------------------------------

# prompt 160 tokens = 10 blocks; total 100 blocks each
# decode(D) = 16 * (running + waiting) + 512 * (1 - (free - missing blocks) / total)
#             + 1 * missing blocks * block_bytes / MiB


@pytest.mark.parametrize(
    "case, request_, decode, expected, costs",
    [
        (
            "more free KV wins at equal load",
            req(160),
            [W("d0", free=20), W("d1", free=90)],
            "d1",
            {"d0": 512 * 0.9, "d1": 512 * 0.2},
        ),
        (
            "the held prefix wins at equal load and free KV (fewer blocks to ship)",
            req(160, decode={"d0": 8}, block_bytes=2 * MiB),
            [W("d0", running=1, free=50), W("d1", running=1, free=50)],
            "d0",
            {"d0": 16 + 512 * 0.52 + 2 * 2, "d1": 16 + 512 * 0.6 + 10 * 2},
        ),
        (
            "free KV outweighs two running sequences",
            req(160),
            [W("d0", running=2, free=90), W("d1", free=60)],
            "d0",
            {"d0": 32 + 512 * 0.2, "d1": 512 * 0.5},
        ),
        (
            "twenty running sequences outweigh free KV",
            req(160),
            [W("d0", running=20, free=90), W("d1", free=60)],
            "d1",
            {"d0": 320 + 512 * 0.2, "d1": 512 * 0.5},
        ),
        (
            "a worker without room for the prompt is not a candidate",
            req(160),
            [W("d0", free=9), W("d1", running=3, free=50)],
            "d1",
            {"d1": 48 + 512 * 0.6},
        ),
        (
            "room counts the blocks it already holds (a candidate, here the fuller one)",
            req(160, decode={"d0": 8}),
            [W("d0", free=2), W("d1", running=3, free=50)],
            "d1",
            {"d0": 512 * 1.0, "d1": 48 + 512 * 0.6},
        ),
        (
            "nobody has room: the most free blocks",
            req(160),
            [W("d0", free=3), W("d1", running=5, free=7), W("d2", free=7, running=6)],
            "d1",
            {"d1": 80 + 512 * 1.03},
        ),
        (
            "down workers are skipped",
            req(160, decode={"d0": 10}),
            [W("d0", up=False), W("d1", running=1, free=20)],
            "d1",
            {"d1": 16 + 512 * 0.9},
        ),
        (
            "large pages: the prefix holder wins though it has less free KV",
            req(160, decode={"d0": 8}, block_bytes=16 * MiB),
            [W("d0", free=40), W("d1", free=50)],
            "d0",
            {"d0": 512 * 0.62 + 2 * 16, "d1": 512 * 0.6 + 10 * 16},
        ),
        (
            "compressed to 1 MiB a block, the bytes saved no longer pay for the fuller pool",
            req(160, decode={"d0": 8}, block_bytes=1 * MiB),
            [W("d0", free=40), W("d1", free=50)],
            "d1",
            {"d0": 512 * 0.62 + 2, "d1": 512 * 0.6 + 10},
        ),
    ],
)
def test_kv_aware_decode(case, request_, decode, expected, costs):
    # the decode half of a (P, D) pair: local prefill off (its own table is below)
    placement = make_policy("kv_aware", local_prefill_max_tokens=0).choose(request_, [W("p0")], decode)
    assert placement.decode == expected, case
    assert {k: v for k, v in placement.costs.items() if k.startswith("d")} == pytest.approx(costs)


def test_kv_aware_joint_choice_and_its_parts():
    """Both halves of a conversation's cache win together: P by its prefix, D by the
    pages it holds (nothing to ship); the chosen pair's parts are reported."""
    r = req(160, prefill={"p1": 10, "p0": 4}, decode={"d0": 10}, block_bytes=MiB)
    got = make_policy().choose(r, [W("p0"), W("p1")], [W("d0", free=50), W("d1", free=50)])
    assert (got.prefill, got.decode) == ("p1", "d0")
    assert got.costs == pytest.approx({"p0": 96, "p1": 0, "d0": 256, "d1": 512 * 0.6 + 10})
    assert got.parts == pytest.approx({
        "prefill_uncached_tokens": 0, "prefill_queued_tokens": 0, "prefill_live_prefixes": 0, "prefill_cost": 0,
        "decode_running": 0, "decode_kv_usage": 0.5, "decode_ship_mib": 0, "decode_cost": 256, "local_prefill": 0,
    })


# ---- kv_aware: local prefill (conditional disaggregation) ----------------------------

# local(D) = uncached on D + 0.2 * queued on D + 16 * (running + waiting) + 512 * kv usage after
# (nothing shipped); chosen when below the best pair's prefill(P) + decode(D) and when D
# holds more leading blocks than every up prefill worker with <= 256 tokens left and at
# most a quarter of its KV in use afterwards.
# Prompt 160 tokens = 10 blocks, pools of 100 blocks, 1 MiB a block.


@pytest.mark.parametrize(
    "case, request_, prefill, decode, expected, cost",
    [
        (
            "a chat turn: D generated the last answer, so it holds 9 blocks, P only the 7 of the last prompt",
            req(160, {"p0": 7}, {"d0": 9}, block_bytes=MiB),
            [W("p0"), W("p1")], [W("d0", free=80)],
            (None, "d0"), 16 + 512 * 0.21,  # remote: 48 + 512 * 0.21 + 1 MiB
        ),
        (
            "P evicted the conversation, D still holds it: D computes the last block instead of P the whole prompt",
            req(160, {}, {"d0": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", running=1, free=80)],
            (None, "d0"), 16 + 16 + 512 * 0.21,
        ),
        (
            "D holds no more than P: shipping from P (P's compute is not the decode batch's)",
            req(160, {"p0": 9}, {"d0": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", free=50)],
            ("p0", "d0"), None,
        ),
        (
            "a longer match on a down prefill worker does not count",
            req(160, {"p0": 9}, {"d0": 8}, block_bytes=MiB),
            [W("p0", up=False), W("p1")], [W("d0", free=80)],
            (None, "d0"), 32 + 512 * 0.22,
        ),
        (
            "too much left to compute on D (over 256 tokens): ship from P",
            req(800, {"p0": 30}, {"d0": 33}, block_bytes=MiB),
            [W("p0")], [W("d0", free=90)],
            ("p0", "d0"), None,
        ),
        (
            "D's queue of local prefills counts like a prefill worker's",
            req(160, {"p0": 7}, {"d0": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", free=80, queued=400)],
            ("p0", "d0"), None,  # local 16 + 80 + ... > remote 48 + ... + 1
        ),
        (
            "of two decode workers holding the conversation, the cheaper one prefills",
            req(160, {"p0": 2}, {"d0": 9, "d1": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", running=3, free=80), W("d1", free=80)],
            (None, "d1"), 16 + 512 * 0.21,
        ),
        (
            "a decode worker over a quarter full afterwards is no candidate (its cached prefix may be evicted first)",
            req(160, {"p0": 7}, {"d0": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", free=70)],
            ("p0", "d0"), None,  # usage after 1 - 69/100 = 0.31
        ),
        (
            "a decode worker without room for the rest is no candidate",
            req(160, {"p0": 2}, {"d0": 9}, block_bytes=MiB),
            [W("p0")], [W("d0", free=0), W("d1", free=50)],
            ("p0", "d1"), None,
        ),
    ],
)
def test_kv_aware_local_prefill(case, request_, prefill, decode, expected, cost):
    got = make_policy("kv_aware", local_prefill_max_tokens=256).choose(request_, prefill, decode)
    assert (got.prefill, got.decode) == expected, case
    assert got.parts["local_prefill"] == (1.0 if expected[0] is None else 0.0)
    if cost is not None:
        assert got.parts["local_cost"] == pytest.approx(cost)
        assert got.costs[f"{expected[1]}/local"] == pytest.approx(cost)
        assert got.parts["decode_ship_mib"] == 0


def test_local_prefill_can_be_turned_off():
    r = req(160, {"p0": 7}, {"d0": 9}, block_bytes=MiB)
    assert make_policy("kv_aware", local_prefill_max_tokens=256).choose(r, [W("p0")], [W("d0", free=80)]).prefill is None
    off = make_policy("kv_aware").choose(r, [W("p0")], [W("d0", free=80)])  # off by default
    assert off.prefill == "p0" and off.parts["local_prefill"] == 0
    assert make_policy("kv_aware", local_prefill_max_tokens=0).choose(r, [W("p0")], [W("d0", free=80)]).prefill == "p0"
    assert make_policy("kv_aware", local_prefill_max_tokens=15).choose(r, [W("p0")], [W("d0", free=80)]).prefill == "p0"
    assert make_policy("kv_aware", local_prefill_max_tokens=16).choose(r, [W("p0")], [W("d0", free=80)]).prefill is None


def test_round_robin_and_least_loaded_never_prefill_locally():
    r = req(160, {}, {"d0": 9}, block_bytes=MiB)
    for name in ("round_robin", "least_loaded"):
        assert make_policy(name).choose(r, [W("p0")], [W("d0", free=80)]).prefill == "p0"


def test_decode_worker_holding_the_prefix_wins_when_the_rest_is_equal():
    r = req(320, prefill={"p0": 20}, decode={"d1": 20}, block_bytes=MiB)
    pool = [W("d0", running=2, free=500, total=1000), W("d1", running=2, free=470, total=1000)]
    got = make_policy().choose(r, [W("p0")], pool)
    assert got.decode == "d1" and got.parts["decode_ship_mib"] == 0
    # without the bytes term (transfer_weight 0) the roomier worker wins instead
    assert make_policy(transfer_weight=0.0).choose(r, [W("p0")], pool).decode == "d0"


def test_kv_aware_colocated_uses_the_colocated_match():
    # prefill_match is the (absent) prefill pool's: ignored; nothing is shipped
    r = req(160, prefill={"c0": 10}, decode={"c1": 10}, block_bytes=MiB)
    got = make_policy("kv_aware").choose(r, [], [W("c0", queued=20), W("c1")])
    assert got.prefill is None and got.decode == "c1"
    assert got.costs == pytest.approx({"c0": 160 + 4 + 512 * 0.1, "c1": 0})
    assert got.parts["prefill_uncached_tokens"] == 0 and got.parts["decode_ship_mib"] == 0


def test_kv_aware_logs_cost_parts_per_candidate(caplog):
    caplog.set_level(logging.DEBUG, logger="router.placement")
    make_policy("kv_aware").choose(req(160, {"p0": 8}), [W("p0", queued=7), W("p1")],
                                   [W("d0", free=90, total=100)])
    text = caplog.text
    assert "prefill p0: cost 33.4 = uncached 32 + 0.2 x queued 7 tok" in text
    assert "prefill p1: cost 160.0 = uncached 160 + 0.2 x queued 0 tok" in text
    assert "decode d0: cost 102.4" in text and "512 x kv usage 0.20" in text


@pytest.mark.parametrize(
    "options",
    [
        {"queue_weight": float("inf")},
        {"running_weight": -1},
        {"kv_usage_weight": float("nan")},
        {"transfer_weight": -0.5},
        {"local_prefill_max_tokens": -1},
        {"cold_match_share": 1.5},
        {"local_prefill_max_kv_usage": -0.1},
        {"live_prefix_weight": -1},
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
        lambda: WorkerSnapshot("w", 0, 0, 10, 10, queued_tokens=-1),
        lambda: PlacementRequest(160, 16, block_bytes=-1.0),
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


def test_kv_aware_spreads_cold_prompts_over_an_idle_pool():
    # Identical cold prompts on an idle pool tie exactly: the ties rotate.
    policy = make_policy("kv_aware")
    pool = [W("p0"), W("p1")]
    chosen = [policy.choose(req(160), pool, [W("d0")]).prefill for _ in range(4)]
    assert sorted(chosen) == ["p0", "p0", "p1", "p1"]
    # a real prefix wins, every time
    assert {policy.choose(req(160, {"p1": 6}), pool, [W("d0")]).prefill for _ in range(4)} == {"p1"}
    # the decisions in between did not advance the rotation: it goes on where it stopped
    assert [policy.choose(req(160), pool, [W("d0")]).prefill for _ in range(2)] == chosen[:2]


def _P(name, queued=0, live=0, cached=0):
    return WorkerSnapshot(name, 0, 0, 100, 100, cached_blocks=cached, queued_tokens=queued, live_prefixes=live)


# A cold prompt (272 tokens; p0 holds only its 1-block header, under cold_match_share)
# pays live_prefix_weight (128) per conversation the worker serves now, on top of
# uncached + 0.2 x queued: (p0, p1) -> (chosen P, its cost).
@pytest.mark.parametrize(
    "p0, p1, chosen, cost",
    [
        # fewer live conversations wins, even behind a first turn's queue (272 x 0.2 = 54.4)
        (_P("p0", live=3), _P("p1", live=2, queued=272), "p1", 272 + 54.4 + 256),
        # ... and behind up to 640 queued tokens (one conversation = 128 = 0.2 x 640)
        (_P("p0", live=3), _P("p1", live=2, queued=639), "p1", 272 + 127.8 + 256),
        (_P("p0", live=3), _P("p1", live=2, queued=641), "p0", 272 + 384),
        # equal conversations: the shorter queue
        (_P("p0", live=2, queued=100), _P("p1", live=2), "p1", 272 + 256),
        # equal in both: the fewest cached blocks (old, dead conversations do not count)
        (_P("p0", live=1, cached=120), _P("p1", live=1, cached=118), "p1", 272 + 128),
        # many cached blocks but nothing live beats a cache serving one conversation
        (_P("p0", live=0, cached=120), _P("p1", live=1, cached=10), "p0", 272),
    ],
)
def test_cold_prompts_balance_on_live_conversations(p0, p1, chosen, cost):
    got = make_policy("kv_aware").choose(req(272, {"p0": 1}), [p0, p1], DEC)
    assert got.prefill == chosen
    assert got.costs[chosen] == pytest.approx(cost) and got.parts["prefill_cost"] == pytest.approx(cost)
    assert got.parts["prefill_live_prefixes"] == {"p0": p0, "p1": p1}[chosen].live_prefixes


def test_held_prompts_ignore_live_conversations():
    """A prompt a worker holds is placed by its prefix: the live term plays no part."""
    busy, quiet = _P("p0", live=5), _P("p1", live=0)
    warm = make_policy("kv_aware").choose(req(272, {"p0": 10}), [busy, quiet], DEC)
    assert warm.prefill == "p0" and warm.costs["p0"] == pytest.approx(272 - 160)
    assert warm.parts["prefill_live_prefixes"] == 0
    # with the weight at 0, a cold prompt sees two equal workers
    off = make_policy("kv_aware", live_prefix_weight=0.0).choose(req(272), [busy, quiet], DEC)
    assert (off.costs["p0"], off.costs["p1"]) == (272, 272)


def test_new_conversations_sharing_a_header_spread():
    """Every conversation starts with the same 1-block system header. Counted as a
    prefix, it sent each new conversation to the worker holding the first one (the
    measured 5-of-6 imbalance); under cold_match_share it is no prefix, and new
    conversations go where the fewest blocks are cached, then alternate."""
    policy = make_policy("kv_aware")
    fuller, emptier = WorkerSnapshot("p0", 0, 0, 100, 100, cached_blocks=40), WorkerSnapshot("p1", 0, 0, 100, 100, cached_blocks=10)
    assert policy.choose(req(272, {"p0": 1}), [fuller, emptier], DEC).prefill == "p1"
    chosen = [policy.choose(req(272, {"p0": 1}), [W("p0"), W("p1")], DEC).prefill for _ in range(4)]
    assert sorted(chosen) == ["p0", "p0", "p1", "p1"] and chosen[0] != chosen[1]
    # with the header counted (cold_match_share 0), every one goes to p0
    counting = make_policy("kv_aware", cold_match_share=0.0)
    assert {counting.choose(req(272, {"p0": 1}), [W("p0"), W("p1")], DEC).prefill for _ in range(4)} == {"p0"}


def test_least_loaded_reports_its_parts():
    got = make_policy("least_loaded").choose(req(), [W("p0", running=2), W("p1")], [W("d0", waiting=3)])
    assert got.parts == {"prefill_load": 0.0, "decode_load": 3.0}


def test_kv_aware_weights_come_from_the_config():
    from cluster.config import ClusterConfig, ConfigError
    from router.service import policy_options

    cfg = ClusterConfig.build({"router": {"kv_aware": {"queue_weight": 0.5, "transfer_weight": 4}}})
    policy = make_policy(cfg.router.policy, **policy_options(cfg))
    assert (policy.queue_weight, policy.running_weight, policy.kv_usage_weight, policy.transfer_weight) == (0.5, 16, 512, 4)
    assert make_policy("kv_aware").queue_weight == ClusterConfig.build({}).router.kv_aware.queue_weight
    rr = ClusterConfig.build({"router": {"policy": "round_robin", "kv_aware": {"queue_weight": 3}}})
    assert make_policy(rr.router.policy, **policy_options(rr)).name == "round_robin"
    for bad in ({"queue_weight": -1}, {"transfer_weight": float("inf")}, {"latency_weight": 1}):
        with pytest.raises(ConfigError):
            ClusterConfig.build({"router": {"kv_aware": bad}})
