"""router/pending_prefixes.py: prefixes placed on a worker and not prefilled yet."""

from cluster.block_hash import hash_blocks
from router.pending_prefixes import PendingPrefixes

BS = 4


def blocks(tokens):
    return hash_blocks(tokens, BS)


def test_a_follow_up_matches_the_in_flight_prompt_it_extends():
    pending = PendingPrefixes()
    turn1 = list(range(40))  # 10 blocks
    pending.add("prefill-0", blocks(turn1))
    turn2 = turn1 + list(range(100, 120))  # the same conversation, 5 more blocks
    assert pending.match(blocks(turn2)) == {"prefill-0": 10}
    other = [7] + turn1[1:]  # differs in the first block: the chain breaks at once
    assert pending.match(blocks(other)) == {}


def test_match_is_the_leading_run_per_worker_and_the_longest_in_flight_prompt_wins():
    pending = PendingPrefixes()
    system = list(range(16))  # 4 blocks shared
    pending.add("prefill-0", blocks(system + [50] * 8))
    pending.add("prefill-1", blocks(system + [60] * 8))
    pending.add("prefill-1", blocks(system + [70] * 16))
    assert pending.match(blocks(system + [70] * 16 + [1] * 4)) == {"prefill-0": 4, "prefill-1": 8}


def test_remove_drops_only_that_prompt_and_twice_is_harmless():
    pending = PendingPrefixes()
    prompt = list(range(32))
    a = pending.add("prefill-0", blocks(prompt))
    b = pending.add("prefill-0", blocks(prompt[:16]))
    pending.remove(a)
    assert pending.match(blocks(prompt)) == {"prefill-0": 4}  # b still holds the first 4 blocks
    pending.remove(a)
    pending.remove(b)
    assert pending.match(blocks(prompt)) == {}
    assert len(pending) == 0


def test_prompts_shorter_than_a_block_on_one_worker_remove_in_any_order():
    """Two short prompts (no full block, no hashes) in flight on one worker, as in a
    batched /v1/completions request: removing both never fails."""
    from router.pending_prefixes import PendingPrefixes

    p = PendingPrefixes()
    a = p.add("prefill-0", [])
    b = p.add("prefill-0", [])
    c = p.add("prefill-0", [11, 12])
    p.remove(c)
    p.remove(a)
    p.remove(b)
    assert len(p) == 0 and p.match([11]) == {}
