"""The paged KV block manager: allocation, reference counts, prefix cache, events.

Physical blocks are shared between sequences that have the same prefix. A block
whose reference count drops to zero goes to the *end* of the free queue but keeps
its hash, so a later request can still hit it; new allocations take blocks from
the *front* (least recently freed first) and only then forget their hash::

    free queue:  front [b7 (h=a1)] [b2 (no hash)] [b4 (h=c3)] back
                   ^ next allocation evicts b7 (emits removed(a1))

A sequence's blocks are freed in reverse order, so the tail of a prefix is evicted
before its head (the head is what most requests share).

Queries (``match_prefix``, ``can_allocate``, ``num_free_blocks``) never change
state; ``allocate`` / ``free`` / ``cache_blocks`` do, and emit KV events.

A hash hit is confirmed before reuse: a cached block keeps the token ids it holds and
the hash it was chained on (its parent's, or its namespace's root for a first block),
and a lookup that brings its tokens only hits a block holding exactly those tokens
after exactly that parent. By induction over the chain, a confirmed prefix is the same
tokens under the same namespace, whatever the 64-bit hash did. A hash hit that fails
the check is a miss (the match stops there), counted in ``hash_mismatches`` when the
lookup is acted on (``allocate``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.block_hash import ROOT_HASH, BlockHash
from cluster.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVSnapshot


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None  # None: the first block (what KV events carry)
    # While cached: the tokens it holds and the hash it was chained on (the parent's, or
    # the namespace's root): what a hash hit is confirmed against. None: not recorded.
    token_ids: tuple[int, ...] | None = None
    chained_on: BlockHash | None = None


@dataclass(frozen=True)
class PrefixMatch:
    """The longest run of a request's leading blocks already in the cache."""

    block_ids: tuple[int, ...]
    num_free: int  # how many of them sit in the free queue (ref_count 0)
    # The block after the match had the next hash but other tokens or another parent
    # (a hash collision): a miss, counted when the match is allocated.
    mismatched: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


NO_MATCH = PrefixMatch((), 0)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []
        self._event_seq = 0
        self.hash_mismatches = 0  # hash hits refused because the block held other tokens

    # ---- queries (side-effect free) -------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now (free, possibly still cached)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[int] | None = None,
        root: BlockHash = ROOT_HASH,
    ) -> PrefixMatch:
        """The cached leading blocks of a request. With ``token_ids`` (the request's
        tokens) and ``root`` (its namespace's chain root), every hit is confirmed: the
        block holds those tokens, chained on that parent. Without them (an advisory
        probe by hash only) hits are not confirmed."""
        if not self.enable_prefix_caching:
            return NO_MATCH
        ids: list[int] = []
        bs = self.block_size
        for i, h in enumerate(block_hashes):
            bid = self._cached.get(h)
            if bid is None:
                break
            if token_ids is not None:
                blk = self.blocks[bid]
                parent = block_hashes[i - 1] if i else root
                if blk.chained_on != parent or blk.token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                    return PrefixMatch(tuple(ids), sum(1 for b in ids if self.blocks[b].ref_count == 0), True)
            ids.append(bid)
        return PrefixMatch(tuple(ids), sum(1 for b in ids if self.blocks[b].ref_count == 0))

    def can_allocate(self, num_new_blocks: int, prefix: PrefixMatch = NO_MATCH) -> bool:
        # Touching a free prefix block takes it out of the free queue too.
        return num_new_blocks + prefix.num_free <= len(self._free)

    def is_cached(self, block_hash: BlockHash) -> bool:
        return block_hash in self._cached

    # ---- mutations ----------------------------------------------------------------

    def allocate(self, num_new_blocks: int, prefix: PrefixMatch = NO_MATCH) -> list[int]:
        """Take a reference on the prefix blocks and ``num_new_blocks`` fresh ones;
        returns the block ids in sequence order."""
        if not self.can_allocate(num_new_blocks, prefix):
            raise MemoryError(
                f"cannot allocate {num_new_blocks} blocks (+{prefix.num_free} cached): "
                f"{len(self._free)} free of {self.num_blocks}"
            )
        self.hash_mismatches += prefix.mismatched
        for bid in prefix.block_ids:
            self._touch(bid)
        evicted: list[BlockHash] = []
        new_ids = []
        for _ in range(num_new_blocks):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                evicted.append(blk.block_hash)
                self._uncache(blk)
            blk.ref_count = 1
            new_ids.append(bid)
        if evicted:
            self._emit(BlockRemoved(self._next_seq(), tuple(evicted)))
        return list(prefix.block_ids) + new_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; tail blocks become evictable first."""
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            if blk.ref_count <= 0:
                raise RuntimeError(f"double free of block {bid}")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[bid] = None

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        start: int,
        end: int,
        token_ids: Sequence[int] | None = None,
        root: BlockHash = ROOT_HASH,
    ) -> int:
        """Register blocks ``[start, end)`` of a sequence (now full and computed) in
        the prefix cache; emits one ``stored`` event for the newly cached run.
        Returns how many were newly cached. A hash already cached by another block
        (two requests computed the same block at once) leaves this copy uncached.
        ``token_ids`` (the sequence's tokens) and ``root`` (its namespace's chain root)
        are kept with each block, so later hits can be confirmed (match_prefix)."""
        if not self.enable_prefix_caching or end <= start:
            return 0
        stored: list[BlockHash] = []
        first_parent: BlockHash | None = None
        newly = 0
        for i in range(start, end):
            blk = self.blocks[block_ids[i]]
            h = block_hashes[i]
            parent = block_hashes[i - 1] if i > 0 else None
            if blk.block_hash is not None or h in self._cached:
                if stored:  # keep each event a contiguous chain
                    self._emit(BlockStored(self._next_seq(), tuple(stored), first_parent))
                    stored = []
                continue
            blk.block_hash, blk.parent_hash = h, parent
            blk.chained_on = root if parent is None else parent
            blk.token_ids = None if token_ids is None else tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self._cached[h] = blk.block_id
            if not stored:
                first_parent = parent
            stored.append(h)
            newly += 1
        if stored:
            self._emit(BlockStored(self._next_seq(), tuple(stored), first_parent))
        return newly

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for blk in self.blocks:
            blk.block_hash = blk.parent_hash = blk.chained_on = blk.token_ids = None
        self._cached.clear()
        self._emit(AllBlocksCleared(self._next_seq()))
        return True

    # ---- events -------------------------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        """Drain the pending events (atomically, in order)."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> KVSnapshot:
        """Every cached block, valid as of the last emitted event's sequence number."""
        pairs = tuple((h, self.blocks[b].parent_hash) for h, b in self._cached.items())
        return KVSnapshot(self._event_seq, pairs)

    # ---- internals ----------------------------------------------------------------

    def _touch(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            del self._free[bid]
        blk.ref_count += 1

    def _uncache(self, blk: KVBlock) -> None:
        if self._cached.get(blk.block_hash) == blk.block_id:
            del self._cached[blk.block_hash]
        blk.block_hash = blk.parent_hash = blk.chained_on = blk.token_ids = None

    def _next_seq(self) -> int:
        self._event_seq += 1
        return self._event_seq

    def _emit(self, event: KVEvent) -> None:
        self._events.append(event)
