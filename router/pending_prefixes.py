"""Prefixes on their way into a worker's cache: the prompts the router has placed on a
worker whose blocks its residency index does not know yet.

The residency index learns a prefix only when it drains the worker's KV events, i.e.
after the prefill. A conversation's next turn (or a burst sharing a system prompt)
often arrives before that; to the index alone it looks cold and is placed by load,
maybe on another worker, where the prefix is computed a second time. The router
therefore also counts, per worker, the block hashes of the prompts it has sent there
and not yet seen in the index, and places by the longer of the two matches.

A prompt stays here past its first token, until an event drain that began after that
token has been applied: the first token says the blocks are stored on the worker, not
that the index has them. The drain waits for the step each worker is in (a prefill
chunk can take a second on a loaded CPU) and visits the workers one after another, so
the index can lag the first token by a second or more. Released at the first token, a
prompt left a window in which neither this nor the index knew its prefix (measured on
the Mooncake replay: a follow-up sent 0.3 s after its 352-token parent's first token
was placed as cold and recomputed 336 tokens, bench/results/serving-mooncake.md)::

    add ─► (prefilling) ─► prefilled ─► drain_started ... applied ─► drained: gone
                              first token        (the index holds the blocks now)

Block hashes are chained (each one covers its whole prefix), so "the leading blocks of
this prompt that some in-flight prompt on the worker shares" is the run of leading
hashes present in that worker's multiset."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Sequence

from cluster.block_hash import BlockHash


class PendingPrefixes:
    def __init__(self) -> None:
        self._by_worker: dict[str, Counter[BlockHash]] = {}
        self._entries: dict[int, tuple[str, tuple[BlockHash, ...]]] = {}
        self._prefilled: set[int] = set()  # first token seen; waiting for the index
        self._ids = itertools.count()

    def add(self, worker: str, block_hashes: Sequence[BlockHash]) -> int:
        """Record a prompt placed on ``worker``; returns a handle for the calls below."""
        handle = next(self._ids)
        hashes = tuple(block_hashes)
        self._entries[handle] = (worker, hashes)
        self._by_worker.setdefault(worker, Counter()).update(hashes)
        return handle

    def prefilled(self, handle: int) -> None:
        """The prompt's first token came back: its blocks are stored on its worker. It
        keeps matching until a drain that starts after this (``drain_started``) has
        been applied to the index (``drained``)."""
        if handle in self._entries:
            self._prefilled.add(handle)

    def end(self, handle: int) -> None:
        """The request ended. A prompt that never got its first token (failed or
        cancelled before) is dropped now; a prefilled one stays until its drain."""
        if handle not in self._prefilled:
            self.remove(handle)

    def drain_started(self) -> frozenset[int]:
        """An event drain is starting: the prompts prefilled by now, whose stored
        blocks that drain brings to the index (pass them to ``drained`` after)."""
        return frozenset(self._prefilled)

    def drained(self, handles: Collection[int], workers: Collection[str]) -> None:
        """The drain that began with ``drain_started() == handles`` has been applied
        for ``workers`` (drained, or down: their cache is not known either way); their
        prompts among ``handles`` are dropped. The others wait for a later drain."""
        for h in handles:
            entry = self._entries.get(h)
            if entry is not None and entry[0] in workers:
                self.remove(h)

    def remove(self, handle: int) -> None:
        """Drop the prompt now, prefilled or not (a migration, a failure). Removing
        twice is harmless."""
        self._prefilled.discard(handle)
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
