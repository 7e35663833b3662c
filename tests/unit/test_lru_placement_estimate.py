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


C = list(range(300, 312))
D = list(range(400, 412))


@pytest.mark.parametrize("prompts, capacity, best, affine, ceiling", [
    # A third conversation evicts A where the affine rule puts it (the fewest started,
    # ties to worker 0); the best placement puts C on B's worker, which never comes back.
    ([A, B, C, A + [1, 2]], 3, 12 * 3 + 2, 12 * 3 + 14, 12 * 3 + 2),
    # Two one-off prompts must evict one of the two conversations: one follow-up misses.
    ([A, B, C, D, A + [1, 2], B + [1, 2]], 3, 12 * 4 + 2 + 14, None, 12 * 4 + 2 + 2),
    # No pressure: the affine rule is already the best, the ceiling.
    ([A, B, B + [3, 4], A + [1, 2]], 100, 12 + 12 + 2 + 2, 12 + 12 + 2 + 2, 12 + 12 + 2 + 2),
])
def test_best_placement_estimate_is_the_exhaustive_optimum(prompts, capacity, best, affine, ceiling):
    """bench.serving.best_placement_estimate: the fewest tokens any assignment of the
    prompts to 2 workers computes in this model; never above the affine rule or
    round-robin, never below the one-unbounded-cache ceiling."""
    import itertools

    from bench.serving import best_placement_estimate

    got = best_placement_estimate(prompts, BS, capacity)
    assert got == best
    hits, total = ideal_prefix_hits(prompts, BS)
    assert total - hits == ceiling <= got
    if affine is not None:
        assert lru_placement_estimate(prompts, BS, 2, capacity, "affine") == affine
    assert got <= lru_placement_estimate(prompts, BS, 2, capacity, "affine")
    assert got <= lru_placement_estimate(prompts, BS, 2, capacity, "round_robin")

    def computed(assign):  # the same model, one fixed assignment
        from collections import OrderedDict

        caches, n = [OrderedDict(), OrderedDict()], 0
        for p, w in zip(prompts, assign):
            keys = [tuple(p[: (b + 1) * BS]) for b in range(len(p) // BS)]
            m = 0
            while m < min(len(keys), (len(p) - 1) // BS) and keys[m] in caches[w]:
                m += 1
            n += len(p) - m * BS
            for k in keys:
                caches[w][k] = None
                caches[w].move_to_end(k)
            while len(caches[w]) > capacity:
                caches[w].popitem(last=False)
        return n

    assert got == min(computed(a) for a in itertools.product((0, 1), repeat=len(prompts)))


def test_best_placement_estimate_gives_up_past_its_node_budget():
    from bench.serving import best_placement_estimate

    prompts = [list(range(1000 * i, 1000 * i + 12)) for i in range(12)]
    assert best_placement_estimate(prompts, BS, 3, max_nodes=5) is None
