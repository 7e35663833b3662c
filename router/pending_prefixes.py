"""Prefixes on their way into a worker's cache: the prompts the router has placed on a
worker whose prefill has not finished yet.

The residency index learns a prefix only when the worker reports its blocks stored,
i.e. after the prefill. A conversation's next turn (or a burst sharing a system prompt)
often arrives before that; to the index alone it looks cold and is placed by load,
maybe on another worker, where the prefix is computed a second time. The router
therefore also counts, per worker, the block hashes of the prompts it has sent there
and not yet seen prefilled, and places by the longer of the two matches.

Block hashes are chained (each one covers its whole prefix), so "the leading blocks of
this prompt that some in-flight prompt on the worker shares" is the run of leading
hashes present in that worker's multiset."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

from cluster.block_hash import BlockHash


class PendingPrefixes:
    def __init__(self) -> None:
        self._by_worker: dict[str, Counter[BlockHash]] = {}
        self._entries: dict[int, tuple[str, tuple[BlockHash, ...]]] = {}
        self._ids = itertools.count()

    def add(self, worker: str, block_hashes: Sequence[BlockHash]) -> int:
        """Record a prompt placed on ``worker``; returns a handle for ``remove``."""
        handle = next(self._ids)
        hashes = tuple(block_hashes)
        self._entries[handle] = (worker, hashes)
        self._by_worker.setdefault(worker, Counter()).update(hashes)
        return handle

    def remove(self, handle: int) -> None:
        """The prompt was prefilled (its blocks are now reported by the worker) or
        failed. Removing twice is harmless."""
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        worker, hashes = entry
        # A prompt shorter than a block has no hashes: another prompt's removal may
        # already have dropped the worker's (empty) counter.
        counts = self._by_worker.get(worker, Counter())
        counts.subtract(hashes)
        for h in hashes:
            if counts[h] <= 0:
                del counts[h]
        if not counts:
            self._by_worker.pop(worker, None)

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Leading blocks of ``block_hashes`` that an in-flight prompt shares, per worker
        (workers with none are absent)."""
        out = {}
        for worker, counts in self._by_worker.items():
            n = 0
            for h in block_hashes:
                if counts.get(h, 0) <= 0:
                    break
                n += 1
            if n:
                out[worker] = n
        return out

    def __len__(self) -> int:
        return len(self._entries)
