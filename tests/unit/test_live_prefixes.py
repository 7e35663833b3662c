"""Unit tests for router/live_prefixes.py: which conversations count as live where,
over small constructed chains of block hashes."""

from __future__ import annotations

import pytest

from router.live_prefixes import LivePrefixes


def test_a_follow_up_turn_continues_its_chain():
    live = LivePrefixes(window_s=5.0)
    a = live.start("p0", ["h1", "h2", "h3"], now=0.0)
    live.finish(a, now=1.0)
    b = live.start("p0", ["h1", "h2", "h3", "h4", "h5"], now=2.0)  # holds the leaf h3
    assert b == a and live.counts(now=2.0) == {"p0": 1} and len(live) == 1
    c = live.start("p1", ["g1", "g2"], now=2.0)  # a new conversation
    assert c != a and live.counts(now=2.0) == {"p0": 1, "p1": 1}


def test_a_shared_header_is_not_a_chain():
    """Two conversations sharing a header block: neither prompt's leaf is the other's."""
    live = LivePrefixes(window_s=5.0)
    live.start("p0", ["sys", "a2", "a3"], now=0.0)
    live.start("p1", ["sys", "b2", "b3"], now=0.0)
    assert live.counts(now=0.0) == {"p0": 1, "p1": 1}


def test_a_conversation_that_moves_counts_where_it_is_now():
    live = LivePrefixes(window_s=5.0)
    a = live.start("p0", ["h1", "h2"], now=0.0)
    live.finish(a, now=1.0)
    live.start("p1", ["h1", "h2", "h3"], now=2.0)
    assert live.counts(now=2.0) == {"p1": 1}


@pytest.mark.parametrize(
    "now, expected",
    [
        (3.0, {"p0": 1, "p1": 1}),  # p0's request still runs; p1's finished at 2, window 5
        (7.0, {"p0": 1, "p1": 1}),  # exactly the window after: still live
        (7.5, {"p0": 1}),  # past it: p1's conversation ended (a think time with no next turn)
        (100.0, {"p0": 1}),  # in flight counts however long it takes
    ],
)
def test_live_while_in_flight_and_a_window_after(now, expected):
    live = LivePrefixes(window_s=5.0)
    live.start("p0", ["a1"], now=0.0)
    b = live.start("p1", ["b1"], now=1.0)
    live.finish(b, now=2.0)
    assert live.counts(now=now) == expected


def test_expired_chains_are_dropped_and_restart_fresh():
    live = LivePrefixes(window_s=1.0)
    a = live.start("p0", ["h1", "h2"], now=0.0)
    live.finish(a, now=0.0)
    assert live.counts(now=5.0) == {} and len(live) == 0
    b = live.start("p1", ["h1", "h2", "h3"], now=5.0)  # its old leaf is forgotten: a new chain
    assert b != a and live.counts(now=5.0) == {"p1": 1}


def test_two_requests_of_one_chain_in_flight():
    """The same prompt twice (a retry, n > 1): one chain, live until both finish."""
    live = LivePrefixes(window_s=0.0)
    a = live.start("p0", ["h1", "h2"], now=0.0)
    b = live.start("p0", ["h1", "h2"], now=0.0)
    assert a == b
    live.finish(a, now=1.0)
    assert live.counts(now=2.0) == {"p0": 1}
    live.finish(b, now=2.0)
    assert live.counts(now=2.5) == {}


def test_a_prompt_without_a_full_block_is_not_tracked():
    live = LivePrefixes(window_s=5.0)
    assert live.start("p0", [], now=0.0) is None
    live.finish(None, now=1.0)
    assert live.counts(now=1.0) == {}


def _learn_gaps(live: LivePrefixes, gap: float, n: int) -> None:
    """``n`` follow-up turns, each ``gap`` seconds after its chain's last answer (fresh
    chains each call)."""
    t = 0.0
    for _ in range(n):
        tag = f"learn{len(live._gaps)}-{t}"
        h = live.start("p0", [tag], now=t)
        live.finish(h, now=t + 1.0)
        live.start("p0", [tag, tag + "b"], now=t + 1.0 + gap)
        t += 100.0  # chains far apart: each gap is one sample


def test_the_live_window_is_learned_from_think_times():
    """Until min_samples gaps are known: window_s. Then twice their p90 (0.5 s -> 1 s,
    the floor; 2 s -> 4 s), never above window_s."""
    live = LivePrefixes(window_s=10.0)
    _learn_gaps(live, 0.5, 7)
    assert live.live_window_s() == 10.0
    _learn_gaps(live, 0.5, 1)
    assert live.live_window_s() == 1.0
    live2 = LivePrefixes(window_s=10.0)
    _learn_gaps(live2, 2.0, 8)
    assert live2.live_window_s() == 4.0
    live3 = LivePrefixes(window_s=3.0)
    _learn_gaps(live3, 2.0, 8)
    assert live3.live_window_s() == 3.0


def test_ended_conversations_stop_counting_after_the_learned_think_time():
    """Clients that answer within 0.5 s: a conversation silent for 2 s has ended as far as
    new placements go (a previous run's conversations must not steer the next run's),
    but it is kept: a late turn still continues it, and its long gap is learned."""
    live = LivePrefixes(window_s=10.0)
    _learn_gaps(live, 0.5, 8)
    t0 = 10_000.0
    a = live.start("p1", ["a1", "a2"], now=t0)
    live.finish(a, now=t0 + 1.0)
    assert live.counts(now=t0 + 1.9)["p1"] == 1  # within 1 s of its answer
    assert "p1" not in live.counts(now=t0 + 3.0)
    b = live.start("p0", ["a1", "a2", "a3"], now=t0 + 6.0)  # the user came back after 5 s
    assert b == a and live.counts(now=t0 + 6.0)["p0"] >= 1
    assert 5.0 in live._gaps
