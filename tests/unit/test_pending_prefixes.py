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


def test_a_prefilled_prompt_matches_until_a_drain_begun_after_its_first_token_is_applied():
    """The first token says the blocks are stored on the worker; the index knows them
    only once a drain that began after it is applied. In between the prompt keeps
    matching (released at the first token, it left a window where nobody knew it)."""
    pending = PendingPrefixes()
    prompt = list(range(40))  # 10 blocks
    early = pending.drain_started()  # a drain already running before the first token
    h = pending.add("prefill-1", blocks(prompt))
    pending.prefilled(h)
    assert pending.match(blocks(prompt)) == {"prefill-1": 10}
    pending.drained(early, {"prefill-0", "prefill-1"})  # it began before: may lack the blocks
    assert pending.match(blocks(prompt)) == {"prefill-1": 10}
    pending.end(h)  # the request ends: still waiting for its drain
    assert pending.match(blocks(prompt)) == {"prefill-1": 10}
    later = pending.drain_started()
    pending.drained(later, {"prefill-0"})  # prefill-1 did not answer this drain
    assert pending.match(blocks(prompt)) == {"prefill-1": 10}
    later = pending.drain_started()
    pending.drained(later, {"prefill-0", "prefill-1"})
    assert pending.match(blocks(prompt)) == {} and len(pending) == 0


def test_a_prompt_without_a_first_token_is_dropped_at_its_end_and_never_by_a_drain():
    pending = PendingPrefixes()
    failed = pending.add("prefill-0", blocks(list(range(32))))
    running = pending.add("prefill-0", blocks(list(range(100, 132))))
    pending.drained(pending.drain_started(), {"prefill-0"})  # neither is prefilled yet
    assert pending.match(blocks(list(range(32)))) == {"prefill-0": 8}
    assert pending.match(blocks(list(range(100, 132)))) == {"prefill-0": 8}
    pending.end(failed)  # failed or cancelled before its first token
    assert pending.match(blocks(list(range(32)))) == {}
    pending.remove(running)  # remove drops a prompt whatever its state
    pending.prefilled(running)  # too late: a no-op, and no drain brings it back
    pending.drained(pending.drain_started(), {"prefill-0"})
    assert len(pending) == 0
