"""bench.workloads.lru_placement_estimate: exact computed-token counts for small
constructed prompt sequences (block size 4), the numbers the serving bench's KV-size
sweep (`python -m bench.serving --kv-sweep`) rests on."""

from __future__ import annotations

import pytest

from bench.workloads import ideal_prefix_hits, lru_placement_estimate

BS = 4
A = list(range(100, 112))  # 3 blocks
B = list(range(200, 212))


def test_two_conversations_alternating_round_robin_vs_affine():
    """A, B, B+2, A+2 on 2 workers: round-robin sends each follow-up to the worker that
    holds the other conversation (both computed whole, 14 tokens); the affine rule sends
    it home (3 full blocks held: only the 2 new tokens computed)."""
    prompts = [A, B, B + [3, 4], A + [1, 2]]
    rr = lru_placement_estimate(prompts, BS, 2, 100, "round_robin")
    af = lru_placement_estimate(prompts, BS, 2, 100, "affine")
    assert rr == 12 + 12 + 14 + 14
    assert af == 12 + 12 + 2 + 2
    hits, total = ideal_prefix_hits(prompts, BS)
    assert total - hits == af  # at no capacity pressure, affine reaches the ceiling here


def test_round_robin_hits_when_the_rotation_lands_home():
    """One worker: the rotation always lands home."""
    assert lru_placement_estimate([A, A + [1, 2]], BS, 1, 100, "round_robin") == 12 + 2


def test_capacity_evicts_least_recently_used_blocks():
    """One worker of 3 blocks: B evicts A, so A's follow-up is computed whole."""
    prompts = [A, B, A + [1, 2]]
    assert lru_placement_estimate(prompts, BS, 1, 3, "affine") == 12 + 12 + 14
    assert lru_placement_estimate(prompts, BS, 1, 6, "affine") == 12 + 12 + 2


def test_last_token_is_always_computed():
    """The same prompt twice: its last full block is recomputed for the logits."""
    assert lru_placement_estimate([A, A], BS, 1, 100, "affine") == 12 + 4


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="round_robin or affine"):
        lru_placement_estimate([A], BS, 1, 10, "kv_aware")
