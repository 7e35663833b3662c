"""The object-tree residency index kept as a test oracle (the one router/residency_index.py
replaced): one Python node per block hash, a set of workers per node, an OrderedDict LRU.
Simple enough to trust; tests apply the same events to both and compare every match.

The residency index: which worker of a pool holds which KV blocks, from their KV events.

A prefix tree over chained block hashes, one node per block hash; each node records
the workers that hold that block. Because a block's hash covers its whole prefix (see
``cluster.block_hash``), a hash names one path from the root, so the index also keeps a
``hash -> node`` map and looks a request's blocks up directly::

    root
     ├── a1 {prefill-0, prefill-1}
     │    ├── b2 {prefill-0}
     │    │    └── c3 {prefill-0}
     │    └── d2 {prefill-1}
     └── e1 {}                      <- prefill-1 evicted e1 but still holds f2
          └── f2 {prefill-1}

    match([a1, b2, c3]) -> {prefill-0: 3, prefill-1: 1}
    match([e1, f2])     -> {prefill-0: 0, prefill-1: 0}   (f2 is useless without e1)

A worker's count is the number of *leading* blocks it holds: it stops at the first
block the worker lacks, even if it holds later ones (its block manager may evict a
parent while a child is still referenced).

Events. Each worker numbers its events 1, 2, 3, ... (and starts at 1 again when it
restarts). They are applied in order; a gap or a sequence number that goes backwards
puts that worker in ``RESYNCING`` mode: its entries are dropped at once (never matched
while untrusted), its further events are dropped, and the caller fetches the worker's
``KVSnapshot`` and calls ``resync``. After a resync at ``snapshot.seq = s`` events with
seq <= s are ignored (the snapshot has them) until seq s + 1 arrives, which continues
normally. A worker that restarts inside that window (before it emits s + 1) cannot be
told apart from stale events: callers that see a restart by other means (the worker's
``started_at`` changed) call ``invalidate`` or ``remove_worker``.

Memory bound. ``max_blocks`` caps the number of (worker, block) entries, not nodes: the
entries are what grows with workers x cache size, and a node lives only while some
worker holds it or one of its descendants. Over the cap, the least recently matched or
stored entries are evicted. Within one touched chain the head is the most recent, so a
chain loses its tail first. An evicted entry makes the index under-report that worker's
prefix (a conservative miss: placement sees less cache than there is, never more), so
after ``evictions > 0`` the index is a subset of the truth rather than exact.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.block_hash import BlockHash
from cluster.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVSnapshot

DEFAULT_MAX_BLOCKS = 1_000_000  # (worker, block) entries; a few hundred bytes each


class WorkerMode(str, enum.Enum):
    EXACT = "exact"  # every event applied in order: entries are what the worker reported
    RESYNCING = "resyncing"  # a gap or a restart was seen: waiting for ``resync``


@dataclass(frozen=True)
class MatchResult:
    """Per worker, how many leading blocks of the looked-up chain it holds. Only
    workers in ``EXACT`` mode appear (a resyncing worker's cache is unknown)."""

    blocks: Mapping[str, int]
    num_queried: int  # length of the looked-up chain

    def num_blocks(self, worker: str) -> int:
        return self.blocks.get(worker, 0)

    def num_tokens(self, worker: str, block_size: int) -> int:
        return self.blocks.get(worker, 0) * block_size

    def best(self) -> tuple[str, int] | None:
        """The worker with the longest match (ties: by name), or None if nobody matched."""
        top = min(self.blocks.items(), key=lambda kv: (-kv[1], kv[0]), default=None)
        return top if top is not None and top[1] > 0 else None


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with one worker's batch of events."""

    worker: str
    applied: int = 0
    ignored: int = 0  # already covered by the last snapshot (seq <= snapshot.seq)
    dropped: int = 0  # arrived while the worker needed a resync
    needs_resync: bool = False
    reason: str | None = None  # why the worker needs a resync


class _Node:
    __slots__ = ("block_hash", "parent", "children", "workers")

    def __init__(self, block_hash: BlockHash | None, parent: _Node | None) -> None:
        self.block_hash = block_hash
        # The root for a chain's first block; None for the root itself and for a
        # placeholder: a parent named by an event before its own stored event arrived.
        self.parent = parent
        self.children: dict[BlockHash, _Node] = {}
        self.workers: set[str] = set()


@dataclass
class _WorkerState:
    mode: WorkerMode = WorkerMode.EXACT
    last_seq: int = 0  # a new worker's first event is seq 1
    stale_until: int | None = None  # after a resync: seq <= this is already applied
    reason: str | None = None
    blocks: set[BlockHash] = field(default_factory=set)


class ResidencyIndex:
    """Exact (event-fed) residency of KV blocks across the workers of one pool."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self.max_blocks = max_blocks
        self.evictions = 0
        self._root = _Node(None, None)
        self._nodes: dict[BlockHash, _Node] = {}
        self._lru: OrderedDict[tuple[str, BlockHash], None] = OrderedDict()  # oldest first
        self._workers: dict[str, _WorkerState] = {}

    @classmethod
    def create_simulated(cls, max_blocks: int = 64) -> ResidencyIndex:
        """A small index for tests and notebooks."""
        return cls(max_blocks=max_blocks)

    # ---- queries ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """(worker, block) entries held now (bounded by ``max_blocks``)."""
        return len(self._lru)

    @property
    def num_nodes(self) -> int:
        """Tree nodes, root excluded (placeholders included)."""
        return len(self._nodes)

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def worker_mode(self, worker: str) -> WorkerMode:
        if worker not in self._workers:
            raise KeyError(f"unknown worker {worker!r}; known: {self.workers}")
        return self._workers[worker].mode

    @property
    def modes(self) -> dict[str, str]:
        return {w: st.mode.value for w, st in sorted(self._workers.items())}

    @property
    def mode(self) -> str:
        """'exact' when every worker is exact, else 'resyncing'."""
        if all(st.mode is WorkerMode.EXACT for st in self._workers.values()):
            return WorkerMode.EXACT.value
        return WorkerMode.RESYNCING.value

    def needs_resync(self) -> list[str]:
        """Workers waiting for ``resync`` (the caller fetches their snapshots)."""
        return sorted(w for w, st in self._workers.items() if st.mode is WorkerMode.RESYNCING)

    def last_seq(self, worker: str) -> int:
        return self._workers[worker].last_seq

    def num_blocks_of(self, worker: str) -> int:
        """How many blocks the index holds for ``worker`` (O(1))."""
        st = self._workers.get(worker)
        return len(st.blocks) if st else 0

    def blocks_of(self, worker: str) -> frozenset[BlockHash]:
        st = self._workers.get(worker)
        return frozenset(st.blocks) if st else frozenset()

    def match(self, block_hashes: Sequence[BlockHash], *, touch: bool = True) -> MatchResult:
        """Leading blocks of ``block_hashes`` held by each exact worker. ``touch`` marks
        the matched entries most recently used (LRU order only; what is resident never
        changes); pass ``touch=False`` for a pure query."""
        exact = [w for w, st in self._workers.items() if st.mode is WorkerMode.EXACT]
        counts = dict.fromkeys(sorted(exact), 0)
        active = set(exact)
        for i, h in enumerate(block_hashes):
            node = self._nodes.get(h)
            if node is None:
                break
            active &= node.workers
            if not active:
                break
            for w in active:
                counts[w] = i + 1
        if touch:
            for w, n in counts.items():
                self._touch(w, block_hashes[:n])
        return MatchResult(counts, len(block_hashes))

    # ---- events -----------------------------------------------------------------------

    def apply(self, worker: str, events: Iterable[KVEvent]) -> ApplyResult:
        """Apply one worker's events in order (see the module docstring for gaps)."""
        st = self._workers.setdefault(worker, _WorkerState())
        applied = ignored = dropped = 0
        for ev in events:
            if st.mode is WorkerMode.RESYNCING:
                dropped += 1
                continue
            if st.stale_until is not None and ev.seq <= st.stale_until:
                ignored += 1
                continue
            if ev.seq != st.last_seq + 1:
                kind = "gap" if ev.seq > st.last_seq else "sequence went backwards (worker restarted?)"
                self.invalidate(worker, f"{kind}: expected seq {st.last_seq + 1}, got {ev.seq}")
                dropped += 1
                continue
            st.stale_until = None
            self._apply_one(worker, st, ev)
            st.last_seq = ev.seq
            applied += 1
        return ApplyResult(worker, applied, ignored, dropped, st.mode is WorkerMode.RESYNCING, st.reason)

    def invalidate(self, worker: str, reason: str = "invalidated by caller") -> None:
        """Stop trusting ``worker`` until ``resync``: its entries are dropped now."""
        st = self._workers.setdefault(worker, _WorkerState())
        self._clear_worker(worker, st)
        st.mode, st.reason, st.stale_until = WorkerMode.RESYNCING, reason, None

    def resync(self, worker: str, snapshot: KVSnapshot) -> None:
        """Replace everything known about ``worker`` with its snapshot."""
        st = self._workers.setdefault(worker, _WorkerState())
        self._clear_worker(worker, st)
        for h, parent in snapshot.blocks:
            self._store_chain(worker, st, (h,), parent)
        # LRU: deepest blocks oldest, so the cap trims chain tails before heads.
        depth = _depths(snapshot.blocks)
        for h, _ in sorted(snapshot.blocks, key=lambda pair: -depth[pair[0]]):
            if (worker, h) in self._lru:
                self._lru.move_to_end((worker, h))
        self._enforce_cap()
        st.mode, st.reason = WorkerMode.EXACT, None
        st.last_seq = st.stale_until = snapshot.seq

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` entirely (scaled down or replaced)."""
        st = self._workers.pop(worker, None)
        if st is not None:
            self._clear_worker(worker, st)

    # ---- internals --------------------------------------------------------------------

    def _apply_one(self, worker: str, st: _WorkerState, ev: KVEvent) -> None:
        if isinstance(ev, BlockStored):
            self._store_chain(worker, st, ev.block_hashes, ev.parent_hash)
            self._touch(worker, ev.block_hashes)
            self._enforce_cap()
        elif isinstance(ev, BlockRemoved):
            for h in ev.block_hashes:
                # a block the index already evicted (or never saw) is simply absent
                if h in st.blocks:
                    self._drop_entry(worker, st, h)
        elif isinstance(ev, AllBlocksCleared):
            self._clear_worker(worker, st)
        else:
            raise TypeError(f"not a KV event: {ev!r}")

    def _store_chain(
        self, worker: str, st: _WorkerState, hashes: Sequence[BlockHash], parent_hash: BlockHash | None
    ) -> None:
        if not hashes:
            return
        parent = self._root if parent_hash is None else self._node_or_placeholder(parent_hash)
        for h in hashes:
            node = self._nodes.get(h)
            if node is None:
                node = self._nodes[h] = _Node(h, parent)
                parent.children[h] = node
            elif node.parent is None:  # a placeholder learns where it hangs
                node.parent = parent
                parent.children[h] = node
            if worker not in node.workers:
                node.workers.add(worker)
                st.blocks.add(h)
                self._lru[(worker, h)] = None
            parent = node

    def _node_or_placeholder(self, h: BlockHash) -> _Node:
        node = self._nodes.get(h)
        if node is None:
            node = self._nodes[h] = _Node(h, None)
        return node

    def _touch(self, worker: str, hashes: Sequence[BlockHash]) -> None:
        # tail first, so the head of the chain ends up most recent
        for h in reversed(hashes):
            key = (worker, h)
            if key in self._lru:
                self._lru.move_to_end(key)

    def _enforce_cap(self) -> None:
        while len(self._lru) > self.max_blocks:
            worker, h = next(iter(self._lru))
            self._drop_entry(worker, self._workers[worker], h)
            self.evictions += 1

    def _drop_entry(self, worker: str, st: _WorkerState, h: BlockHash) -> None:
        del self._lru[(worker, h)]
        st.blocks.discard(h)
        node = self._nodes[h]
        node.workers.discard(worker)
        self._prune(node)

    def _clear_worker(self, worker: str, st: _WorkerState) -> None:
        for h in list(st.blocks):
            self._drop_entry(worker, st, h)

    def _prune(self, node: _Node) -> None:
        """Delete ``node`` and then its ancestors while they hold nothing."""
        while node is not None and node is not self._root and not node.workers and not node.children:
            del self._nodes[node.block_hash]
            parent = node.parent
            if parent is not None:
                del parent.children[node.block_hash]
            node = parent


def _depths(pairs: Sequence[tuple[BlockHash, BlockHash | None]]) -> dict[BlockHash, int]:
    """Depth of each block within a snapshot (a block whose parent is not in the
    snapshot counts as depth 0)."""
    parent_of = dict(pairs)
    depth: dict[BlockHash, int] = {}
    for h in parent_of:
        path = []
        cur: BlockHash | None = h
        while cur is not None and cur in parent_of and cur not in depth:
            path.append(cur)
            cur = parent_of[cur]
            if len(path) > len(parent_of):  # a cycle can only come from a corrupt snapshot
                raise ValueError("KV snapshot parent links form a cycle")
        base = depth[cur] + 1 if cur is not None and cur in depth else 0
        for i, b in enumerate(reversed(path)):
            depth[b] = base + i
    return depth
