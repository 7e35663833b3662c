"""Unit tests for workers/block_manager.py (in the style of vLLM's prefix-caching
tests): a tiny pool, exact block ids, ref counts, LRU eviction order and events."""

from __future__ import annotations

import pytest

from cluster.block_hash import hash_blocks
from cluster.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVSnapshot
from workers.block_manager import NO_MATCH, BlockManager, PrefixMatch

NUM_BLOCKS = 11
BS = 4


def toks(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def hashes(n_blocks: int, base: int = 0, bs: int = BS) -> list[int]:
    h = hash_blocks(toks(n_blocks * bs, base), bs)
    assert len(h) == n_blocks
    return h


def refs(bm: BlockManager, ids) -> list[int]:
    return [bm.blocks[i].ref_count for i in ids]


def free_order(bm: BlockManager) -> list[int]:
    """The free queue, front first, observed through the public API by allocating
    every free block (which evicts any cached ones): only use it late in a test."""
    return bm.allocate(bm.num_free_blocks)


@pytest.fixture
def bm() -> BlockManager:
    return BlockManager(NUM_BLOCKS, BS)


def run_seq(bm: BlockManager, h: list[int]) -> list[int]:
    """Admit a sequence whose full blocks hash to ``h`` (with prefix matching),
    compute it and cache all of its blocks; returns its block ids."""
    m = bm.match_prefix(h)
    ids = bm.allocate(len(h) - m.num_blocks, m)
    bm.cache_blocks(ids, h, m.num_blocks, len(h))
    return ids


# ---- construction / basic queries ----------------------------------------------


@pytest.mark.parametrize("nb,bs", [(0, 4), (-1, 4), (4, 0), (4, -2)])
def test_init_rejects_nonpositive(nb, bs):
    with pytest.raises(ValueError):
        BlockManager(nb, bs)


def test_initial_state(bm):
    assert bm.num_free_blocks == NUM_BLOCKS
    assert bm.usage == 0.0
    assert all(b.ref_count == 0 and b.block_hash is None for b in bm.blocks)
    assert [b.block_id for b in bm.blocks] == list(range(NUM_BLOCKS))
    assert bm.take_events() == []
    assert bm.snapshot() == KVSnapshot(0, ())


def test_blocks_for(bm):
    assert [bm.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_prefix_match_num_blocks():
    assert PrefixMatch((3, 1, 4), 2).num_blocks == 3
    assert NO_MATCH.num_blocks == 0 and NO_MATCH.num_free == 0


# ---- allocation ------------------------------------------------------------------


def test_fresh_allocation_ids_in_order(bm):
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.allocate(2) == [3, 4]
    assert bm.allocate(0) == []
    assert refs(bm, range(NUM_BLOCKS)) == [1] * 5 + [0] * 6
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(5 / 11)
    assert bm.take_events() == []  # nothing was cached, nothing evicted


def test_can_allocate_edge_and_memory_error(bm):
    assert bm.can_allocate(NUM_BLOCKS)
    assert not bm.can_allocate(NUM_BLOCKS + 1)
    with pytest.raises(MemoryError):
        bm.allocate(NUM_BLOCKS + 1)
    # A failed allocation changes nothing.
    assert bm.num_free_blocks == NUM_BLOCKS
    assert refs(bm, range(NUM_BLOCKS)) == [0] * NUM_BLOCKS

    assert bm.allocate(10) == list(range(10))
    assert bm.can_allocate(1)
    assert not bm.can_allocate(2)
    assert bm.allocate(1) == [10]
    assert bm.can_allocate(0)
    assert not bm.can_allocate(1)
    with pytest.raises(MemoryError):
        bm.allocate(1)
    assert bm.num_free_blocks == 0
    assert bm.usage == 1.0
    assert refs(bm, range(NUM_BLOCKS)) == [1] * NUM_BLOCKS


def test_freed_blocks_go_to_back_in_reverse_order(bm):
    a = bm.allocate(3)
    assert a == [0, 1, 2]
    bm.free(a)
    assert refs(bm, a) == [0, 0, 0]
    assert bm.num_free_blocks == NUM_BLOCKS
    # Front of the queue is the never-used blocks; the freed ones are at the back,
    # tail first.
    assert bm.allocate(8) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert bm.allocate(3) == [2, 1, 0]
    assert bm.take_events() == []  # uncached blocks: no BlockRemoved


def test_free_decrements_and_double_free_raises(bm):
    ids = bm.allocate(2)
    bm.free(ids)
    with pytest.raises(RuntimeError):
        bm.free([ids[0]])
    with pytest.raises(RuntimeError):
        bm.free([5])  # never allocated
    assert bm.num_free_blocks == NUM_BLOCKS


def test_double_free_of_shared_block(bm):
    h = hashes(2)
    a = run_seq(bm, h)
    b = run_seq(bm, h)
    assert a == b == [0, 1]
    assert refs(bm, a) == [2, 2]
    bm.free(a)
    bm.free(b)
    assert refs(bm, a) == [0, 0]
    with pytest.raises(RuntimeError):
        bm.free(a)


# ---- match_prefix ----------------------------------------------------------------


def test_match_prefix_empty_cache(bm):
    assert bm.match_prefix(hashes(3)) == NO_MATCH
    assert bm.match_prefix([]) == NO_MATCH


def test_match_prefix_is_side_effect_free(bm):
    h = hashes(3)
    ids = run_seq(bm, h)
    assert ids == [0, 1, 2]
    bm.take_events()
    m1 = bm.match_prefix(h)
    m2 = bm.match_prefix(h)
    assert m1 == m2 == PrefixMatch((0, 1, 2), 0)
    assert refs(bm, ids) == [1, 1, 1]
    bm.free(ids)
    bm.take_events()
    m3 = bm.match_prefix(h)
    m4 = bm.match_prefix(h)
    assert m3 == m4 == PrefixMatch((0, 1, 2), 3)
    assert refs(bm, ids) == [0, 0, 0]
    assert bm.num_free_blocks == NUM_BLOCKS
    assert bm.take_events() == []
    assert bm.snapshot().seq == 1
    # The free queue order was not touched by matching: still [3..10, 2, 1, 0].
    assert free_order(bm) == [3, 4, 5, 6, 7, 8, 9, 10, 2, 1, 0]


def test_match_prefix_stops_at_first_miss(bm):
    h = hashes(3)
    run_seq(bm, h)
    other = hashes(1, base=1000)[0]
    assert bm.match_prefix([h[0], h[1], other, h[2]]) == PrefixMatch((0, 1), 0)
    # A miss at the front means no match even though later hashes are cached.
    assert bm.match_prefix([other, h[0], h[1]]) == NO_MATCH
    assert bm.match_prefix(h[:1]) == PrefixMatch((0,), 0)
    # Longer query than what is cached.
    assert bm.match_prefix(hashes(5)) == PrefixMatch((0, 1, 2), 0)


def test_prefix_caching_disabled():
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=False)
    h = hashes(3)
    ids = bm.allocate(3)
    assert bm.cache_blocks(ids, h, 0, 3) == 0
    assert bm.take_events() == []
    assert not any(bm.is_cached(x) for x in h)
    assert all(b.block_hash is None for b in bm.blocks)
    assert bm.match_prefix(h) == NO_MATCH
    assert bm.snapshot() == KVSnapshot(0, ())
    bm.free(ids)
    assert bm.match_prefix(h) == NO_MATCH
    # A second identical sequence gets fresh blocks (no sharing).
    assert bm.allocate(3) == [3, 4, 5]
    assert bm.take_events() == []


# ---- sharing ---------------------------------------------------------------------


def test_sharing_same_prefix(bm):
    common = toks(8)  # 2 full blocks
    ha = hash_blocks(common + toks(4, 100), BS)  # 3 blocks
    hb = hash_blocks(common + toks(4, 200), BS)  # 3 blocks, same first 2
    assert ha[:2] == hb[:2] and ha[2] != hb[2]

    a = run_seq(bm, ha)
    assert a == [0, 1, 2]
    mb = bm.match_prefix(hb)
    assert mb == PrefixMatch((0, 1), 0)
    b = bm.allocate(1, mb)
    assert b == [0, 1, 3]
    assert refs(bm, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert bm.num_free_blocks == NUM_BLOCKS - 4
    assert bm.cache_blocks(b, hb, 2, 3) == 1

    bm.free(a)
    assert refs(bm, [0, 1, 2, 3]) == [1, 1, 0, 1]
    assert bm.num_free_blocks == NUM_BLOCKS - 3  # only block 2 came back
    assert bm.match_prefix(hb) == PrefixMatch((0, 1, 3), 0)
    assert bm.match_prefix(ha) == PrefixMatch((0, 1, 2), 1)

    bm.free(b)
    assert refs(bm, [0, 1, 2, 3]) == [0, 0, 0, 0]
    # Queue: never used [4..10], then A's tail (2), then B in reverse (3, 1, 0).
    assert free_order(bm) == [4, 5, 6, 7, 8, 9, 10, 2, 3, 1, 0]


def test_can_allocate_accounts_for_free_prefix_blocks(bm):
    h = hashes(3)
    a = run_seq(bm, h)
    bm.free(a)
    filler = bm.allocate(8)  # [3..10]: the only free blocks left are 2, 1, 0
    assert filler == [3, 4, 5, 6, 7, 8, 9, 10]
    assert bm.num_free_blocks == 3
    m = bm.match_prefix(h)
    assert m == PrefixMatch((0, 1, 2), 3)
    assert bm.can_allocate(0, m)
    assert not bm.can_allocate(1, m)  # 1 new + 3 prefix blocks out of the queue > 3
    with pytest.raises(MemoryError):
        bm.allocate(1, m)
    assert refs(bm, [0, 1, 2]) == [0, 0, 0]  # failed allocate touched nothing
    assert bm.allocate(0, m) == [0, 1, 2]
    assert refs(bm, [0, 1, 2]) == [1, 1, 1]
    assert bm.num_free_blocks == 0
    assert bm.take_events() == [BlockStored(1, tuple(h), None)]  # no removals

    # A prefix held by someone else (ref > 0) costs nothing from the free queue.
    m2 = bm.match_prefix(h)
    assert m2 == PrefixMatch((0, 1, 2), 0)
    assert bm.can_allocate(0, m2)
    assert bm.allocate(0, m2) == [0, 1, 2]
    assert refs(bm, [0, 1, 2]) == [2, 2, 2]


def test_cached_free_block_hit_is_removed_from_free_queue(bm):
    h = hashes(3)
    a = run_seq(bm, h)
    bm.free(a)
    bm.take_events()
    m = bm.match_prefix(h)
    assert m == PrefixMatch((0, 1, 2), 3)
    ids = bm.allocate(1, m)
    assert ids == [0, 1, 2, 3]
    assert refs(bm, ids) == [1, 1, 1, 1]
    assert bm.num_free_blocks == 7
    assert bm.allocate(7) == [4, 5, 6, 7, 8, 9, 10]
    assert not bm.can_allocate(1)
    assert bm.take_events() == []  # the hit blocks were not evicted
    assert all(bm.is_cached(x) for x in h)


def test_partial_prefix_hit_middle_of_free_queue(bm):
    h = hashes(3)
    a = run_seq(bm, h)
    bm.free(a)  # queue: [3..10, 2, 1, 0]
    bm.take_events()
    m = bm.match_prefix(h[:2])
    assert m == PrefixMatch((0, 1), 2)
    ids = bm.allocate(2, m)
    assert ids == [0, 1, 3, 4]
    bm.free(ids)  # queue: [5..10, 2, 4, 3, 1, 0]
    assert bm.take_events() == []
    assert free_order(bm) == [5, 6, 7, 8, 9, 10, 2, 4, 3, 1, 0]
    # Cached blocks are evicted in queue order: h[2] (freed first), then 1, then 0.
    assert bm.take_events() == [BlockRemoved(2, (h[2], h[1], h[0]))]


# ---- cache_blocks / events -------------------------------------------------------


def test_cache_blocks_single_run_event(bm):
    h = hashes(3)
    ids = bm.allocate(3)
    assert bm.cache_blocks(ids, h, 0, 3) == 3
    assert bm.take_events() == [BlockStored(1, (h[0], h[1], h[2]), None)]
    assert bm.take_events() == []  # drained
    assert [bm.blocks[i].block_hash for i in ids] == h
    assert [bm.blocks[i].parent_hash for i in ids] == [None, h[0], h[1]]
    assert all(bm.is_cached(x) for x in h)


def test_cache_blocks_incremental_parent(bm):
    h = hashes(4)
    ids = bm.allocate(4)
    assert bm.cache_blocks(ids, h, 0, 2) == 2
    assert bm.cache_blocks(ids, h, 2, 2) == 0  # empty range: nothing
    assert bm.cache_blocks(ids, h, 3, 2) == 0  # reversed range: nothing
    assert bm.cache_blocks(ids, h, 2, 3) == 1
    assert bm.cache_blocks(ids, h, 3, 4) == 1
    assert bm.take_events() == [
        BlockStored(1, (h[0], h[1]), None),
        BlockStored(2, (h[2],), h[1]),
        BlockStored(3, (h[3],), h[2]),
    ]


def test_cache_blocks_skips_already_cached_prefix(bm):
    h = hashes(3)
    ids = bm.allocate(3)
    bm.cache_blocks(ids, h, 0, 2)
    # Re-registering a range that includes already-cached blocks only stores the rest.
    bm.cache_blocks(ids, h, 0, 3)
    assert bm.take_events() == [
        BlockStored(1, (h[0], h[1]), None),
        BlockStored(2, (h[2],), h[1]),
    ]


def test_duplicate_hash_not_cached_twice(bm):
    h = hashes(3)
    # Two requests with the same prompt were admitted before either was cached,
    # so both got fresh blocks and both computed the same KV.
    a = bm.allocate(3)
    b = bm.allocate(3)
    assert a == [0, 1, 2] and b == [3, 4, 5]
    bm.cache_blocks(a, h, 0, 3)
    bm.cache_blocks(b, h, 0, 3)
    assert bm.take_events() == [BlockStored(1, tuple(h), None)]  # once only
    assert [bm.blocks[i].block_hash for i in b] == [None, None, None]
    assert bm.match_prefix(h) == PrefixMatch((0, 1, 2), 0)
    assert bm.snapshot() == KVSnapshot(1, ((h[0], None), (h[1], h[0]), (h[2], h[1])))

    # B's uncached copies, once freed and reused, emit no BlockRemoved; A's
    # cached ones are still hit.
    bm.free(b)
    assert bm.allocate(8) == [6, 7, 8, 9, 10, 5, 4, 3]
    assert bm.take_events() == []
    assert bm.match_prefix(h) == PrefixMatch((0, 1, 2), 0)


def test_duplicate_hash_partial_overlap(bm):
    common = toks(8)
    ha = hash_blocks(common + toks(4, 100), BS)
    hb = hash_blocks(common + toks(4, 200), BS)
    a = bm.allocate(3)
    b = bm.allocate(3)
    bm.cache_blocks(a, ha, 0, 3)
    bm.cache_blocks(b, hb, 0, 3)
    # B's first two blocks duplicate A's; only its third is new, chained on hb[1].
    assert bm.take_events() == [
        BlockStored(1, tuple(ha), None),
        BlockStored(2, (hb[2],), hb[1]),
    ]
    assert bm.match_prefix(hb) == PrefixMatch((0, 1, 5), 0)


def test_cache_blocks_splits_runs_around_duplicate(bm):
    h = hashes(4)
    # Another sequence's block (id 1) already holds h[1].
    other = [bm.allocate(1)[0], bm.allocate(1)[0]]
    assert other == [0, 1]
    bm.cache_blocks(other, h, 1, 2)  # caches h[1] on block 1 with parent h[0]
    ids = bm.allocate(4)
    assert ids == [2, 3, 4, 5]
    bm.cache_blocks(ids, h, 0, 4)
    assert bm.take_events() == [
        BlockStored(1, (h[1],), h[0]),
        BlockStored(2, (h[0],), None),  # run before the duplicate
        BlockStored(3, (h[2], h[3]), h[1]),  # run after it, parent is the dup
    ]
    assert bm.blocks[3].block_hash is None
    assert bm.match_prefix(h) == PrefixMatch((2, 1, 4, 5), 0)


def test_cache_blocks_returns_number_newly_cached(bm):
    h = hashes(3)
    a = bm.allocate(3)
    b = bm.allocate(3)
    assert bm.cache_blocks(a, h, 0, 3) == 3
    assert bm.cache_blocks(b, h, 0, 3) == 0  # all three were duplicates
    assert bm.cache_blocks(a, h, 0, 3) == 0  # already cached by these very blocks


# ---- eviction --------------------------------------------------------------------


def test_eviction_order_tail_first_lru(bm):
    ha = hashes(3, base=0)
    hb = hashes(3, base=1000)
    a = run_seq(bm, ha)
    b = run_seq(bm, hb)
    assert a == [0, 1, 2] and b == [3, 4, 5]
    assert bm.take_events() == [BlockStored(1, tuple(ha), None), BlockStored(2, tuple(hb), None)]

    bm.free(a)
    bm.free(b)
    # Queue: [6, 7, 8, 9, 10, 2, 1, 0, 5, 4, 3]
    assert bm.num_free_blocks == NUM_BLOCKS
    # Never-used blocks go first: no eviction.
    assert bm.allocate(5) == [6, 7, 8, 9, 10]
    assert bm.take_events() == []
    assert bm.match_prefix(ha) == PrefixMatch((0, 1, 2), 3)

    # Next: A's blocks tail first, then B's tail.
    assert bm.allocate(4) == [2, 1, 0, 5]
    assert bm.take_events() == [BlockRemoved(3, (ha[2], ha[1], ha[0], hb[2]))]
    assert not any(bm.is_cached(x) for x in ha)
    assert [bm.is_cached(x) for x in hb] == [True, True, False]
    assert bm.match_prefix(ha) == NO_MATCH
    assert bm.match_prefix(hb) == PrefixMatch((3, 4), 2)
    assert all(bm.blocks[i].block_hash is None for i in (0, 1, 2, 5))

    assert bm.allocate(1) == [4]
    assert bm.take_events() == [BlockRemoved(4, (hb[1],))]
    assert bm.match_prefix(hb) == PrefixMatch((3,), 1)
    assert bm.snapshot() == KVSnapshot(4, ((hb[0], None),))


def test_recently_hit_prefix_is_evicted_last(bm):
    ha = hashes(2, base=0)
    hb = hashes(2, base=1000)
    a = run_seq(bm, ha)  # [0, 1]
    b = run_seq(bm, hb)  # [2, 3]
    bm.free(a)
    bm.free(b)
    # A is hit again (moves out of the queue), then freed again -> back of queue.
    a2 = run_seq(bm, ha)
    assert a2 == [0, 1]
    bm.free(a2)
    bm.take_events()
    # Queue: [4..10, 3, 2, 1, 0]
    assert bm.allocate(7) == [4, 5, 6, 7, 8, 9, 10]
    assert bm.allocate(3) == [3, 2, 1]
    assert bm.take_events() == [BlockRemoved(3, (hb[1], hb[0], ha[1]))]
    assert bm.match_prefix(ha) == PrefixMatch((0,), 1)


def test_evicted_block_can_be_recached(bm):
    h = hashes(1)
    a = run_seq(bm, h)
    bm.free(a)
    assert bm.allocate(NUM_BLOCKS) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert bm.take_events() == [BlockStored(1, (h[0],), None), BlockRemoved(2, (h[0],))]
    assert not bm.is_cached(h[0])
    bm.cache_blocks([5], h, 0, 1)
    assert bm.take_events() == [BlockStored(3, (h[0],), None)]
    assert bm.match_prefix(h) == PrefixMatch((5,), 0)


# ---- snapshot --------------------------------------------------------------------


def test_snapshot_pairs_and_seq(bm):
    ha = hashes(3)
    hb = hashes(2, base=500)
    run_seq(bm, ha)
    assert bm.snapshot() == KVSnapshot(1, ((ha[0], None), (ha[1], ha[0]), (ha[2], ha[1])))
    run_seq(bm, hb)
    snap = bm.snapshot()
    assert snap.seq == 2
    assert snap.blocks == (
        (ha[0], None),
        (ha[1], ha[0]),
        (ha[2], ha[1]),
        (hb[0], None),
        (hb[1], hb[0]),
    )
    # snapshot() does not consume events, and take_events() does not move seq.
    assert len(bm.take_events()) == 2
    assert bm.snapshot() == snap


# ---- reset -----------------------------------------------------------------------


def test_reset_prefix_cache_refused_while_in_use(bm):
    h = hashes(2)
    ids = run_seq(bm, h)
    bm.take_events()
    assert bm.reset_prefix_cache() is False
    assert bm.take_events() == []
    assert all(bm.is_cached(x) for x in h)
    assert bm.snapshot().seq == 1
    bm.free(ids[1:])
    assert bm.reset_prefix_cache() is False  # block 0 still in use
    assert bm.is_cached(h[0])


def test_reset_prefix_cache_clears_when_all_free(bm):
    h = hashes(2)
    ids = run_seq(bm, h)
    bm.free(ids)
    assert bm.reset_prefix_cache() is True
    assert bm.take_events() == [BlockStored(1, tuple(h), None), AllBlocksCleared(2)]
    assert not any(bm.is_cached(x) for x in h)
    assert all(b.block_hash is None and b.parent_hash is None for b in bm.blocks)
    assert bm.match_prefix(h) == NO_MATCH
    assert bm.snapshot() == KVSnapshot(2, ())
    assert bm.num_free_blocks == NUM_BLOCKS
    # Reusing formerly cached blocks no longer emits removals; seq keeps counting.
    assert bm.allocate(NUM_BLOCKS) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 0]
    assert bm.take_events() == []
    bm.free(list(range(NUM_BLOCKS)))
    assert bm.reset_prefix_cache() is True
    assert bm.take_events() == [AllBlocksCleared(3)]


def test_event_seq_monotonic_across_event_types(bm):
    h = hashes(2)
    a = run_seq(bm, h)
    bm.free(a)
    bm.allocate(NUM_BLOCKS)  # evicts both
    bm.free(list(range(NUM_BLOCKS)))
    bm.reset_prefix_cache()
    run_seq(bm, hashes(1, base=77))
    evs = bm.take_events()
    assert [type(e) for e in evs] == [BlockStored, BlockRemoved, AllBlocksCleared, BlockStored]
    assert [e.seq for e in evs] == [1, 2, 3, 4]
    assert evs[1] == BlockRemoved(2, (h[1], h[0]))
    assert bm.snapshot().seq == 4


def test_block_size_16_pool():
    bm = BlockManager(NUM_BLOCKS, 16)
    prompt = toks(40)  # 2 full blocks + 8 tokens
    h = hash_blocks(prompt, 16)
    assert len(h) == 2
    need = bm.blocks_for(len(prompt))
    assert need == 3
    ids = bm.allocate(need)
    assert ids == [0, 1, 2]
    bm.cache_blocks(ids, h, 0, len(h))
    assert bm.take_events() == [BlockStored(1, tuple(h), None)]
    # Same prompt again: two full blocks hit, the partial one is new.
    m = bm.match_prefix(h)
    assert m == PrefixMatch((0, 1), 0)
    ids2 = bm.allocate(need - m.num_blocks, m)
    assert ids2 == [0, 1, 3]
    assert refs(bm, [0, 1, 2, 3]) == [2, 2, 1, 1]


# ---- hash hits confirmed against token ids (issue 12) --------------------------------


def test_confirmed_hit_with_tokens_and_root(bm):
    t = toks(3 * BS)
    h = hash_blocks(t, BS)
    ids = bm.allocate(3)
    bm.cache_blocks(ids, h, 0, 3, t)
    assert bm.match_prefix(h, t) == PrefixMatch(tuple(ids), 0)
    assert bm.match_prefix(h[:2], t) == PrefixMatch(tuple(ids[:2]), 0)


def test_forced_collision_with_other_tokens_is_a_miss_and_counted(bm):
    """Two prompts made to share hashes (what a 64-bit collision would do): the second
    must not reuse the first's KV. Its first block's tokens match, the second's differ."""
    a = toks(3 * BS)
    b = list(a)
    b[BS + 1] = 999  # block 1 differs
    h = hash_blocks(a, BS)  # both are looked up under a's hashes: forced collision
    ids = bm.allocate(3)
    bm.cache_blocks(ids, h, 0, 3, a)
    bm.free(ids)
    m = bm.match_prefix(h, b)
    assert m == PrefixMatch((ids[0],), 1, mismatched=True)  # only the truly equal block 0
    assert bm.hash_mismatches == 0  # a query changes nothing
    got = bm.allocate(2, m)  # b computes blocks 1 and 2 itself, in fresh blocks
    assert got[0] == ids[0] and ids[1] not in got and ids[2] not in got
    assert bm.hash_mismatches == 1  # counted when acted on
    # a's chain is untouched and still confirmed for a itself.
    assert bm.match_prefix(h, a) == PrefixMatch(tuple(ids), 2)


def test_collision_on_the_first_block_or_in_the_chain_is_a_miss(bm):
    a = toks(2 * BS)
    h = hash_blocks(a, BS)
    ids = bm.allocate(2)
    bm.cache_blocks(ids, h, 0, 2, a, root=111)
    # Same tokens under another namespace's root (a cross-tenant collision): a miss.
    assert bm.match_prefix(h, a, root=222) == PrefixMatch((), 0, mismatched=True)
    assert bm.match_prefix(h, a, root=111) == PrefixMatch(tuple(ids), 0)
    # Block 1 found by hash but chained on another parent than the lookup's block 0.
    other = [h[0] ^ 1, h[1]]
    bm2 = BlockManager(NUM_BLOCKS, BS)
    ids2 = bm2.allocate(2)
    bm2.cache_blocks(ids2, h, 0, 2, a, root=111)
    bm2.cache_blocks(bm2.allocate(1), other, 0, 1, a, root=111)  # other[0] holds a's block 0 tokens too
    assert bm2.match_prefix(other, a, root=111) == PrefixMatch((2,), 0, mismatched=True)


def test_lookup_without_tokens_is_by_hash_only(bm):
    a = toks(2 * BS)
    h = hash_blocks(a, BS)
    ids = bm.allocate(2)
    bm.cache_blocks(ids, h, 0, 2, a)
    assert bm.match_prefix(h) == PrefixMatch(tuple(ids), 0)  # an advisory probe (cached_prefix_blocks)


def test_evicted_block_forgets_its_tokens(bm):
    a = toks(BS)
    h = hash_blocks(a, BS)
    [bid] = bm.allocate(1)
    bm.cache_blocks([bid], h, 0, 1, a)
    bm.free([bid])
    bm.allocate(NUM_BLOCKS)  # evicts everything
    assert bm.blocks[bid].token_ids is None and bm.blocks[bid].chained_on is None
    assert bm.match_prefix(h, a) == NO_MATCH
