"""Live prefixes: how many conversations (prompt chains) each compute worker serves now.

A new (cold) conversation should go to the prefill worker whose cache serves the fewest
live conversations: under KV pressure, a worker with one conversation too many evicts
its own live prefixes while the other keeps dead ones (measured on 6 x 10-turn chat at
120 blocks per worker: 4 : 2 splits computed 5,700-6,600 prompt tokens, 3 : 3 splits
about 4,000; bench/results/chat_diagnosis.md).

Without session ids, a conversation is a chain of prompts each extending the last: a
follow-up turn's prompt holds its previous prompt's last full block (block hashes are
chained, so that one hash stands for the whole previous prompt). The tracker keeps, per
chain, its newest prompt's last block hash (its *leaf*) and where it was placed::

    turn 1: [h1 h2 h3]            leaf h3 -> prefill-0
    turn 2: [h1 h2 h3 h4 h5]      h3 found in the prompt: the chain moves on, leaf h5
    new:    [g1 g2]               nothing found: a new chain, leaf g2

A chain is live while one of its requests is in flight, and for a think time after its
last one finished (the client's pause before the next turn). The time a request takes
is not part of the window: under load it varies tenfold, and a window long enough for
it would count the conversations that ended many seconds ago as live. (Measured
before this: the prompt tokens placed on a worker, decayed with a 30 s half-life; the
conversations of a previous run still differed by ~1,500 tokens between the workers,
more than a new conversation's first turn, and sent 4 of the next 6 to one worker.)

The think time is learned, not guessed: every follow-up turn records its gap (from its
chain's last answer to it), and once ``min_samples`` gaps are known an idle chain
counts as live for ``think_factor`` x the 90th percentile of the last ``samples``
gaps (at least ``min_window_s``, at most ``window_s``)::

    live window = clamp(think_factor * p90(recent gaps), min_window_s, window_s)

A fixed window of 10 s counted a previous run's ended conversations as live through a
new run's whole start burst (6 conversations in ~10 s): the new ones were balanced
against phantoms and split 2 : 4 once those expired (chat_diagnosis.md, item 11; the
chat bench's think time is 0.5 s, so its learned window is ~1-2 s). A chain idle
past the live window is still kept until ``window_s``, so a turn that comes late
continues its chain and its long gap is recorded (the estimate is not biased toward
the users who answer fast).

Ask / act: ``counts`` is side-effect free except for dropping expired chains;
``start`` / ``finish`` bracket one request.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass
class _Chain:
    worker: str
    inflight: int  # requests of this chain still running
    finished_at: float  # when the last one finished (meaningful when inflight == 0)


class LivePrefixes:
    def __init__(self, window_s: float, think_factor: float = 2.0, min_window_s: float = 1.0,
                 min_samples: int = 8, samples: int = 64) -> None:
        for k, v in (("window_s", window_s), ("think_factor", think_factor), ("min_window_s", min_window_s)):
            if not v >= 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        if not 1 <= min_samples <= samples:
            raise ValueError(f"need 1 <= min_samples ({min_samples}) <= samples ({samples})")
        self.window_s = window_s
        self.think_factor = think_factor
        self.min_window_s = min(min_window_s, window_s)
        self.min_samples = min_samples
        self._gaps: deque[float] = deque(maxlen=samples)  # recent think times (s), oldest first
        self._by_leaf: dict[Hashable, int] = {}  # leaf block hash -> chain id
        self._chains: dict[int, tuple[Hashable, _Chain]] = {}  # chain id -> (its leaf, state)
        self._ids = itertools.count()

    def start(self, worker: str, block_hashes: Sequence[Hashable], now: float) -> int | None:
        """A request with these block hashes was placed on ``worker`` (its compute
        worker); returns a handle for ``finish`` (None: the prompt has no full block).
        The newest earlier leaf among its hashes is the chain it continues."""
        if not block_hashes:
            return None
        chain_id = None
        for h in reversed(block_hashes):  # the deepest leaf: the chain's latest turn
            if (cid := self._by_leaf.get(h)) is not None:
                chain_id = cid
                break
        leaf = block_hashes[-1]
        if chain_id is None:
            chain_id = self._by_leaf.get(leaf)  # the same prompt again joins its chain
        if chain_id is None:
            chain_id = next(self._ids)
            chain = _Chain(worker, 0, now)
        else:
            old_leaf, chain = self._chains[chain_id]
            if self._by_leaf.get(old_leaf) == chain_id:
                del self._by_leaf[old_leaf]
            if chain.inflight == 0:  # the next turn after an answer: one think time
                self._gaps.append(max(0.0, now - chain.finished_at))
            chain.worker = worker  # a conversation that moved is live where it is now
        chain.inflight += 1
        self._by_leaf[leaf] = chain_id
        self._chains[chain_id] = (leaf, chain)
        return chain_id

    def finish(self, handle: int | None, now: float) -> None:
        """The request of ``handle`` ended (answered, failed or cancelled)."""
        entry = self._chains.get(handle) if handle is not None else None
        if entry is not None:
            chain = entry[1]
            chain.inflight = max(0, chain.inflight - 1)
            chain.finished_at = max(chain.finished_at, now)

    def live_window_s(self) -> float:
        """How long an idle chain counts as live: ``window_s`` until ``min_samples``
        think times are known, then ``think_factor`` x their 90th percentile, clamped
        to [min_window_s, window_s]."""
        n = len(self._gaps)
        if n < self.min_samples:
            return self.window_s
        p90 = sorted(self._gaps)[int(0.9 * (n - 1))]
        return min(self.window_s, max(self.min_window_s, self.think_factor * p90))

    def counts(self, now: float) -> dict[str, int]:
        """Live chains per worker (workers with none are absent); chains idle for more
        than ``window_s`` are dropped (between the live window and that, kept but not
        counted)."""
        out: dict[str, int] = {}
        expired = []
        live_s = self.live_window_s()
        for cid, (leaf, chain) in self._chains.items():
            idle = now - chain.finished_at
            if chain.inflight or idle <= live_s:
                out[chain.worker] = out.get(chain.worker, 0) + 1
            elif idle > self.window_s:
                expired.append((cid, leaf))
        for cid, leaf in expired:
            del self._chains[cid]
            if self._by_leaf.get(leaf) == cid:
                del self._by_leaf[leaf]
        return out

    def __len__(self) -> int:
        return len(self._chains)
